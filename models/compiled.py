"""Compiled decode steps for CPU: inductor's C++ GEMM templates on frozen weights.

Decoding is a chain of matrix-vector products, bound by how fast the weights stream from memory.
Eager PyTorch streams bf16 weights at ~14-18 GB/s on 2 cores; compiled with `max_autotune` and the
C++ GEMM backend (weights frozen into the graph, prepacked) the step runs ~2.5x faster in bf16 and
more in int8 (BENCHMARKS.md). The compile takes 1-3 minutes on 2 cores, so it runs in a background
thread while the eager step serves, and `generate` and the `BatchGenerator` switch to it once it
is ready; inductor's on-disk cache makes later processes compile faster.

Two graphs, each for every position and cache size (dynamic lengths): one token of one sequence
(`model(token, cache, start)`, attention in the graph), and one token each of any number of
sequences (`forward_step` over a `layers.BatchStep`, the `BatchGenerator`'s decode steps). In
the second, each layer's attention is one opaque op (`attend_step`) that runs the sequences'
attention over their own caches eagerly, as vLLM's attention op does: traced, those caches and
lengths would become guards, and every new mix of requests a recompile. Steps with prompt chunks
run eager, which is faster for them (measured: BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import torch
from torch import nn

from .layers import BatchStep, KVCache

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


_STEP = threading.local()  # the BatchStep of the compiled batched call running on this thread


@torch.library.custom_op("ernie_studio::attend_step", mutates_args=())
def attend_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """`BatchStep.attend` of the step in progress (it writes k and v into the sequences' caches)."""
    return _STEP.step.attend(layer, q, k, v).contiguous()


@attend_step.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return q.new_empty(q.shape)


class _OpaqueStep:
    """Stands for the step in progress inside the compiled graph: its positions are an input, its
    attention the opaque op."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
        return torch.ops.ernie_studio.attend_step(q, k, v, layer)


class CompiledDecode:
    """The compiled steps: one token of one sequence once `ready` is set, one token each of
    several once `batch_ready` is. Calls before then (or after a failed compile, logged once)
    return None: the caller runs the eager step."""

    def __init__(self, model: nn.Module, background: bool = True) -> None:
        self.model = model
        self.ready, self.batch_ready = threading.Event(), threading.Event()
        self.failed: str | None = None
        self._step = torch.compile(self._eager_step, dynamic=True)
        self._batch = torch.compile(self._eager_batch, dynamic=True)
        if background:
            # Not a daemon: interpreter exit in the middle of a compile aborts the process.
            threading.Thread(target=self.warm_up, name="compile-decode").start()
        else:
            self.warm_up()

    def _eager_step(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        return self.model(token, cache=cache, start=start)

    def _eager_batch(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.forward_step(_OpaqueStep(positions), input_ids, None)

    def warm_up(self) -> None:
        """Compile on scratch caches (the graphs serve any cache of the model). Their sizes and
        positions match no model dimension, so that no size is taken for another (a guard that
        would fail, and recompile, on the first real call)."""
        try:
            # The settings as a patch around the compile: passed as torch.compile options, freezing
            # does not take effect (half the speed, measured).
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.inference_mode():
                device = self.model.device
                self.model.inv_freq(device)  # made lazily: made before, not during, the trace
                scratch = [self.model.new_cache(1, 61) for _ in range(3)]
                self._step(torch.zeros((1, 1), dtype=torch.long, device=device), scratch[0], 37)
                self.ready.set()
                step = BatchStep([(cache, 37 + i, 1) for i, cache in enumerate(scratch)])
                self._run_batch(step, torch.zeros(3, dtype=torch.long, device=device))
            self.batch_ready.set()
        except Exception as error:  # no compiler, an inductor limitation: eager stays in charge
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("compiling the decode steps failed; what is not compiled stays eager (%s)", self.failed)

    def _run_batch(self, step: BatchStep, input_ids: torch.Tensor) -> torch.Tensor:
        _STEP.step = step
        try:
            return self._batch(input_ids, step.positions.to(input_ids.device))
        finally:
            _STEP.step = None

    def batch(self, step: BatchStep, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [1, N, V] of a step that feeds one token [N] to each of N >= 2 sequences."""
        if not self.batch_ready.is_set() or input_ids.numel() < 2:  # one: `__call__`
            return None
        return self._run_batch(step, input_ids)

    def __call__(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor | None:
        return self._step(token, cache, start) if self.ready.is_set() else None


def decode_step(model: nn.Module, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits of one token [1, 1] at `start`: the compiled step once it is ready, else eager."""
    fast = getattr(model, "fast_decode", None)
    logits = None if fast is None else fast(token, cache, start)
    return model(token, cache=cache, start=start) if logits is None else logits


def decode_batch(model: nn.Module, step: BatchStep, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, N, V] of one token [N] for each of the step's N sequences: compiled once that
    graph is ready, else eager."""
    fast = getattr(model, "fast_decode", None)
    logits = None if fast is None else fast.batch(step, input_ids)
    return model.forward_step(step, input_ids, None) if logits is None else logits
