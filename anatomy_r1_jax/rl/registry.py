"""Name -> function registries: a new variant is a new registered function, not a new flag.

Every pluggable piece (rewards, advantage estimators, policy losses, loss aggregations, similarity
backends, curriculum schedules, GDQA triggers) keeps one `Registry`; configs name the entry.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F")


class Registry(Generic[F]):
    """A mapping name -> entry (a callable, or e.g. a policy loss's (config, function) pair) filled
    by the `register(name)` decorator.

    Registering a second, different entry under a taken name is an error (it would silently
    change what a config means); re-registering the same function object (an equal entry) is allowed.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            existing = self._entries.get(name)
            if existing is not None and existing != fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({existing!r})")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}") from None

    def unregister(self, name: str) -> None:
        """Removes `name` (tests that register an entry of their own leave the registry as they found it)."""
        del self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
