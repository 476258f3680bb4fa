"""Name -> function tables that configs and callers look losses up in."""
from __future__ import annotations

from typing import Callable


class Registry(dict):
    """A name -> function table filled by a decorator; looking up an unknown name fails in one line that lists the
    known ones (a typo in a config then says what it could have been)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return deco

    def lookup(self, name: str) -> Callable:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self))}") from None


LOSSES = Registry("loss")  # token losses of SFT and distillation
register_loss = LOSSES.register
get_loss = LOSSES.lookup
