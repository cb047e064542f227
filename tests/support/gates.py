"""A forward pre-hook that parks a torch worker thread in a module, for
deterministic cancellation tests (threading events, never sleeps)."""

from __future__ import annotations

import threading
from typing import Any


class Gate:
    """Parks the worker at the ``on_call``-th call of ``module`` until ``go`` is set;
    ``reached`` is set once it is parked."""

    def __init__(self, module: Any, *, on_call: int) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        self.on_call = on_call
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: Any, args: Any) -> None:
        self.calls += 1
        if self.calls == self.on_call:
            self.reached.set()
            self.go.wait()
