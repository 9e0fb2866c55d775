"""A compiled one-token decode step for CPU: inductor's C++ GEMM templates on frozen weights.

Decoding one token is a chain of matrix-vector products, bound by how fast the weights stream
from memory. Eager PyTorch streams bf16 weights at ~14 GB/s on 2 cores; the same step compiled
with `max_autotune` and the C++ GEMM backend (weights frozen into the graph, prepacked) runs
2.6x faster in bf16 and 5x faster in int8 (BENCHMARKS.md). The compile takes 1-2 minutes on 2
cores, so it runs in a background thread while the eager step serves, and `generate` and the
`BatchGenerator` switch to it once it is ready. Lengths are dynamic (one graph for every position
and cache size); inductor's on-disk cache makes later processes compile faster.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import torch
from torch import nn

from .layers import KVCache

log = logging.getLogger(__name__)

INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
SETTING = "ERNIE_STUDIO_COMPILE"  # "auto" (default), "1" always where possible, "0" never


def compile_wanted(model: nn.Module, compile_decode: bool | None) -> bool:
    """Whether `load_model` compiles the decode step of an ERNIE 4.5 text model: asked for, or by
    default (None, and ERNIE_STUDIO_COMPILE unset or "auto") for a dense one on the CPU; never
    without a C++ compiler (inductor's CPU backend needs one)."""
    if type(model).__name__ != "Ernie45ForCausalLM":  # the VL and ErnieM models run eager
        return False
    if compile_decode is None:
        setting = os.environ.get(SETTING, "auto").lower()
        dense_on_cpu = model.config.moe_num_experts == 0 and model.device.type == "cpu"
        compile_decode = setting in ("1", "true", "on") or (setting == "auto" and dense_on_cpu)
    return compile_decode and shutil.which(os.environ.get("CXX", "g++")) is not None


class CompiledDecode:
    """`model(token [1, 1], cache, start)` compiled, ready once `ready` is set. Calls before
    then (or after a failed compile, logged once) return None: the caller runs the eager step."""

    def __init__(self, model: nn.Module, background: bool = True) -> None:
        self.model = model
        self.ready = threading.Event()
        self.failed: str | None = None
        self._step = torch.compile(self._eager_step, dynamic=True)
        if background:
            # Not a daemon: interpreter exit in the middle of a compile aborts the process.
            threading.Thread(target=self.warm_up, name="compile-decode").start()
        else:
            self.warm_up()

    def _eager_step(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        return self.model(token, cache=cache, start=start)

    def warm_up(self) -> None:
        """Compile on a scratch cache (the graph serves any cache of the model). Its size and
        position match no model dimension, so that no size is taken for another (a guard that
        would fail, and recompile, on the first real call)."""
        try:
            # The settings as a patch around the compile: passed as torch.compile options, freezing
            # does not take effect (half the speed, measured).
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.inference_mode():
                self.model.inv_freq(self.model.device)  # made lazily: made before, not during, the trace
                scratch = self.model.new_cache(1, 61)
                self._step(torch.zeros((1, 1), dtype=torch.long, device=self.model.device), scratch, 37)
            self.ready.set()
        except Exception as error:  # no compiler, an inductor limitation: eager stays in charge
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("compiling the decode step failed; decoding stays eager (%s)", self.failed)

    def __call__(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor | None:
        return self._step(token, cache, start) if self.ready.is_set() else None


def decode_step(model: nn.Module, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits of one token [1, 1] at `start`: the compiled step once it is ready, else eager."""
    fast = getattr(model, "fast_decode", None)
    logits = None if fast is None else fast(token, cache, start)
    return model(token, cache=cache, start=start) if logits is None else logits
