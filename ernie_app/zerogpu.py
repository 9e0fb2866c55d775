"""ZeroGPU: a GPU is attached to a Space only while a function decorated with `spaces.GPU` runs,
so every request handler that runs model work wears `gpu`. Without the `spaces` package it is a
no-op, and off ZeroGPU `spaces.GPU` hands the function back unchanged, so the code runs everywhere.

`spaces` is imported with this module, before any model touches CUDA, as ZeroGPU asks.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

try:
    import spaces
except ImportError:
    spaces = None

Handler = TypeVar("Handler", bound=Callable)


def duration_seconds() -> int:
    """GPU time one request asks for (ZeroGPU's default is 60 s; shorter queues better)."""
    return int(os.environ.get("ERNIE_STUDIO_ZEROGPU_DURATION", 120))


def gpu(handler: Handler) -> Handler:
    """`handler` (a function or a generator function) under `spaces.GPU`, or unchanged without `spaces`."""
    if spaces is None:
        return handler
    return spaces.GPU(duration=duration_seconds())(handler)
