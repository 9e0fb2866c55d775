"""Compiled decode steps for CPU: inductor's C++ GEMM templates on frozen weights.

Decoding is a chain of matrix-vector products, bound by how fast the weights stream from memory.
Eager PyTorch streams bf16 weights at ~14-18 GB/s on 2 cores; compiled with `max_autotune` and the
C++ GEMM backend (weights frozen into the graph, prepacked) the step runs ~2.5x faster in bf16 and
more in int8 (BENCHMARKS.md). The compile takes a few minutes on 2 cores, so it runs in a
background thread while the eager step serves, and `generate` and the `BatchGenerator` switch to
each graph once it is ready.

The graphs: one token of one sequence (`model(token, cache, start)`, attention in the graph,
dynamic positions and cache sizes), and one token each of 4 or of 8 sequences (`forward_step` over
a `layers.BatchStep`; fewer are padded up, more run in groups of the largest). In the latter, each
layer's attention is one opaque op (`attend_step`) that runs the sequences' attention over their
own caches eagerly, as vLLM's attention op does: traced, those caches and lengths would become
guards, and every new mix of requests a recompile. Their row counts are static because the GEMM
kernels chosen for a symbolic count stream the weights again per block of rows (8 rows: 93 ms a
step, static 52 ms). The opaque op costs the one-token step 5-12% (bf16, int8), hence its own
graph. Steps with prompt chunks run eager, which is faster for them (measured: BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BatchStep, KVCache
from .quantize import Int8Linear

log = logging.getLogger(__name__)

INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# One bf16 row: inductor's C++ GEMM template only. Autotune, timing with the weights in cache,
# picks oneDNN's linear for some shapes, which then streams them from memory at half the speed
# (BENCHMARKS.md, 2026-12-08). For batched rows and int8 weights oneDNN's kernels win where it
# picks them (8 bf16 rows: a step ~2x slower with the template alone; one int8 row: 20 ms vs 15).
ONE_BF16_ROW_OPTIONS = {**INDUCTOR_OPTIONS, "max_autotune_gemm_backends": "CPP"}
SETTING = "ERNIE_STUDIO_COMPILE"  # "auto" (default), "1" always where possible, "0" never
ROW_BUCKETS = (1, 4, 8)  # rows of the compiled steps, compiled in this order; more rows run 8 at a time
# int8 weights: the weight-only kernels' time grows with the rows (2 rows ~1.9x, 4 ~2.2x, 8 ~6x one
# row's), so 8 rows run as two steps of 4, which is faster (BENCHMARKS.md).
INT8_ROW_BUCKETS = (1, 4)


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


_STEP = threading.local()  # the BatchStep of the compiled call running on this thread


@torch.library.custom_op("ernie_studio::attend_step", mutates_args=())
def attend_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """`BatchStep.attend` of the step in progress (it writes k and v into the sequences' caches);
    the padding rows after the step's tokens get zeros."""
    step: BatchStep = _STEP.step
    n = step.positions.numel()
    out = step.attend(layer, q[:, :, :n], k[:, :, :n], v[:, :, :n])
    return F.pad(out, (0, 0, 0, q.shape[2] - n))  # also makes it contiguous


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
    """The compiled decode steps, one graph per row count in `buckets` (ROW_BUCKETS, or
    INT8_ROW_BUCKETS for an int8 model); `rows_ready` lists those compiled so far, and `done` is
    set when the compile has ended (`failed` says why, if it failed). A call with no graph ready
    for its rows returns None: the caller runs the eager step."""

    def __init__(self, model: nn.Module, background: bool = True) -> None:
        self.model = model
        self.int8 = any(isinstance(m, Int8Linear) for m in model.modules())
        self.buckets = INT8_ROW_BUCKETS if self.int8 else ROW_BUCKETS
        self.rows_ready: list[int] = []
        self.done = threading.Event()
        self.failed: str | None = None
        # The weights are frozen into the graphs, so the model's modules are theirs alone: no guards
        # on them (checking them took 0.7 ms of each call, now 0.2).
        guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._one = torch.compile(self._eager_one, dynamic=True, options=guards)
        self._many = torch.compile(self._eager_many, dynamic=False, options=guards)  # a graph per row count
        if background:
            # Not a daemon: interpreter exit in the middle of a compile aborts the process.
            threading.Thread(target=self.warm_up, name="compile-decode").start()
        else:
            self.warm_up()

    def _eager_one(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        return self.model(token, cache=cache, start=start)

    def _eager_many(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.forward_step(_OpaqueStep(positions), input_ids, None)

    def warm_up(self) -> None:
        """Compile every row count on scratch caches (the graphs serve any cache of the model).
        Their sizes and positions match no model dimension, so that no size is taken for another
        (a guard that would fail, and recompile, on the first real call)."""
        try:
            with torch.inference_mode():
                device = self.model.device
                self.model.inv_freq(device)  # made lazily: made before, not during, the trace
                for rows in self.buckets:
                    options = ONE_BF16_ROW_OPTIONS if rows == 1 and not self.int8 else INDUCTOR_OPTIONS
                    step = BatchStep([(self.model.new_cache(1, 61), 37, 1) for _ in range(rows)])
                    # A patch around the compile: passed as torch.compile options, freezing does
                    # not take effect (half the speed, measured).
                    with torch._inductor.config.patch(options):
                        self._run(step, torch.zeros(rows, dtype=torch.long, device=device), rows)
                    self.rows_ready.append(rows)
        except Exception as error:  # no compiler, an inductor limitation: eager stays in charge
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("compiling the decode steps failed; what is not compiled stays eager (%s)", self.failed)
        finally:
            self.done.set()

    def _run(self, step: BatchStep, input_ids: torch.Tensor, rows: int) -> torch.Tensor:
        """Logits [1, N, V] of the step's N tokens through the graph of `rows` >= N rows."""
        n = input_ids.numel()
        if rows == 1:
            ((cache, start, _),) = step.segments
            return self._one(input_ids.view(1, 1), cache, start)
        padding = (0, rows - n)
        _STEP.step = step
        try:
            logits = self._many(F.pad(input_ids, padding), F.pad(step.positions.to(input_ids.device), padding))
        finally:
            _STEP.step = None
        return logits[:, :n]

    def __call__(self, step: BatchStep, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [1, N, V] of a step that feeds one token (`input_ids` [N]) to each of its N
        sequences, or None while no graph takes N rows."""
        ready, n = list(self.rows_ready), input_ids.numel()
        rows = min((r for r in ready if r >= n), default=None)
        if rows is not None:
            return self._run(step, input_ids, rows)
        rows = self.buckets[-1]
        if rows not in ready:
            return None
        segments = step.segments  # more rows than a graph takes: in groups
        return torch.cat([self._run(BatchStep(segments[i : i + rows]), input_ids[i : i + rows], rows)
                          for i in range(0, n, rows)], dim=1)

    def one(self, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor | None:
        """Logits of one token [1, 1] of one sequence at `start`, or None while that graph is not
        ready (`generate`'s step: no BatchStep to build)."""
        return self._one(token, cache, start) if 1 in self.rows_ready else None


def decode_step(model: nn.Module, token: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits of one token [1, 1] at `start`: compiled once that graph is ready, else eager."""
    fast = getattr(model, "fast_decode", None)
    logits = None if fast is None else fast.one(token, cache, start)
    return model(token, cache=cache, start=start) if logits is None else logits


def decode_batch(model: nn.Module, step: BatchStep, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, N, V] of one token [N] for each of the step's N sequences: compiled once a
    graph for N rows is ready, else eager."""
    fast = getattr(model, "fast_decode", None)
    logits = None if fast is None else fast(step, input_ids)
    return model.forward_step(step, input_ids, None) if logits is None else logits
