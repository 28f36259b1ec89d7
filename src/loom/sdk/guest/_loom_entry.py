"""A Python inferlet's entry point: runs the app's ``async def main(args)``.

``loom build`` compiles this module as the component's world implementation; it imports
the user's ``app`` module, runs ``main`` on the SDK's loop and turns its outcome into
the instance's: a returned string is sent to the client, an exception ends the instance
with its traceback as the error.
"""

import inspect
import traceback

# The app is imported here, at build time: the component is snapshotted after its
# imports, and an inferlet has no filesystem to import from later.
import app
import wit_world
from componentize_py_types import Err
from inferlet import _loop
from inferlet._wit import types
from inferlet.io import get_arguments, send


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        main = getattr(app, "main", None)
        if main is None or not inspect.iscoroutinefunction(main):
            raise Err("app.py must define `async def main(args: list[str]) -> str | None`")
        try:
            result = _loop.run(main(get_arguments()), lambda ids: list(types.poll(ids)))
        except BaseException as e:
            raise Err(_format_error(e)) from None
        if result is not None:
            send(str(result))


def _format_error(e: BaseException) -> str:
    """The traceback without source lines: the sandbox has no files to read them from
    (and its stubbed filesystem calls trap)."""
    frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__), lookup_lines=False)
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
    lines.append(f"{type(e).__name__}: {e}")
    return "\n".join(lines)
