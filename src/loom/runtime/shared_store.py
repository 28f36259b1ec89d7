"""The key-value store all inferlets share, with each program's bytes held to a quota.

Values outlive the instance that wrote them, so without a quota one program could fill the
server's memory with them a value at a time. Each key is charged to the program that last
wrote it (key plus value, UTF-8 bytes); overwriting or deleting a key gives its bytes back
to the program that was charged.
"""

from __future__ import annotations

from collections.abc import Iterator

from loom.runtime.wasm.ffi import HostCallError


class SharedStore:
    """``key -> value`` strings, every key charged to one program's quota."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self._charged: dict[str, tuple[str, int]] = {}  # key -> (program, bytes)
        self._used: dict[str, int] = {}  # program -> bytes charged to it

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def used(self, program: str) -> int:
        """Bytes of keys and values charged to ``program``."""
        return self._used.get(program, 0)

    def set(self, program: str, key: str, value: str, quota_bytes: int) -> None:
        """Store ``value`` under ``key`` for ``program``; a HostCallError when the program's
        keys and values would take more than ``quota_bytes`` (the store is unchanged)."""
        size = len(key.encode()) + len(value.encode())
        old_program, old_size = self._charged.get(key, ("", 0))
        after = self.used(program) + size - (old_size if old_program == program else 0)
        if after > quota_bytes:
            raise HostCallError(f"store: this program's values would take {after} bytes "
                                f"(at most {quota_bytes}); delete some first")  # fmt: skip
        self._uncharge(key)
        self._values[key] = value
        self._charged[key] = (program, size)
        self._used[program] = self.used(program) + size

    def pop(self, key: str, default: str | None = None) -> str | None:
        self._uncharge(key)
        return self._values.pop(key, default)

    def _uncharge(self, key: str) -> None:
        charged = self._charged.pop(key, None)
        if charged is None:
            return
        program, size = charged
        left = self._used[program] - size
        if left:
            self._used[program] = left
        else:
            del self._used[program]
