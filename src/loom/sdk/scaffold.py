"""``loom new NAME``: a starter inferlet folder."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = Path(__file__).parent / "templates" / "starter.py"


def new_inferlet(name: str, parent: Path = Path(".")) -> Path:
    """Write ``parent/NAME/app.py`` from the starter template; returns the folder."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
        raise ValueError(f"{name!r} is not a valid inferlet name (letters, digits, _ and -)")
    folder = Path(parent) / name
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(TEMPLATE.read_text().replace("NAME", name))
    return folder
