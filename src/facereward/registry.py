"""One small name -> object registry, used wherever users plug in their own parts (degradations, judges, ...)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; errors name the kind and list what is known."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error, e.g. how to register one
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, overwrite: bool = False) -> None:
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            hint = f"; {self.hint}" if self.hint else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{hint}") from None

    def unregister(self, name: str) -> None:
        """Remove `name` if present (for tests and interactive sessions)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
