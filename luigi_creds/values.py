"""Immutable value types written out, for the modules a task's process imports.

Owns `Frozen`, the base of the package's small immutable values (credentials, settings, the
agent's endpoint, refresh windows). `@dataclass(frozen=True)` would do the same, but it compiles
its methods with `exec()` when its module is imported, and Luigi imports `TaskCredentials` afresh
in every task process it forks: measured in such a process, a frozen dataclass costs 2.2 ms to
define against 0.2 ms for a class written out, and the credential path defined nine of them
(about 10 ms of the 23 ms of CPU its imports cost each task). A subclass lists its fields in
`_fields` (its `__slots__` too), in the order of its `__init__`'s parameters, and fills them with
`_fill`. Kept from a frozen dataclass: assigning raises `FrozenInstanceError`; equality and
hashing compare the fields; the repr lists the fields but those in `_secret`; `replace()` returns
a copy with some fields changed; pickling works.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any, ClassVar, Self

__all__ = ["Frozen"]


class Frozen:
    """Base of a written-out immutable value type (see the module text)."""

    __slots__ = ()
    # The fields, in the order of __init__'s parameters (a subclass's __slots__ too).
    _fields: ClassVar[tuple[str, ...]] = ()
    # Fields kept out of the repr (secrets).
    _secret: ClassVar[frozenset[str]] = frozenset()

    def _fill(self, *values: Any) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied (as `dataclasses.replace`)."""
        fields = {name: getattr(self, name) for name in self._fields}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        return type(self)(**{**fields, **changes})

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._secret
        )
        return f"{type(self).__qualname__}({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._values())
