"""``log``: guest log lines into the server's log, tagged with the instance id."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import STRING, ComponentLinker, enum

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("log")
LEVEL = enum("debug", "info", "warning", "error")
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
_NAMES = ("debug", "info", "warning", "error")
logger = logging.getLogger("loom.inferlet")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    def log(key: int, level: int, message: str) -> None:
        inst = rt.caller(key)
        text = message[: rt.config.max_message_bytes]
        logger.log(_LEVELS[level], "[%s] %s", inst.id, text)
        listener = inst.handle.listener
        if listener is not None:
            listener("log", (_NAMES[level], text))

    linker.add_func(NAME, "log", [LEVEL, STRING], None, log)
