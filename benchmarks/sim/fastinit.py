"""Build frozen dataclass instances without their per-field `object.__setattr__` calls.

The simulator makes one `WorkerView` per changed worker per routing decision and one
`RequestInfo` per request; a frozen dataclass `__init__` costs ~4x a dict update. The fast
path is used only when it is provably equivalent: every field is given, the class has no
`__slots__`, no `__post_init__` and no `default_factory` fields it would skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def fast_constructor(cls: type[T], names: tuple[str, ...]) -> Callable[..., T]:
    """A function(*values) -> cls instance taking exactly `names`, in that order."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    safe = (set(names) == fields and "__slots__" not in vars(cls)
            and not hasattr(cls, "__post_init__"))
    if not safe:
        return lambda *values: cls(**dict(zip(names, values, strict=True)))
    new = object.__new__

    def make(*values: Any) -> T:
        obj = new(cls)
        obj.__dict__.update(zip(names, values, strict=True))
        return obj

    return make
