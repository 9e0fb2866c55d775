"""Our C kernel for decode attention on the CPU (decode_attention.c), built with the system C
compiler and called through ctypes as the torch op `ernie_studio::decode_attention`.

It is built at import (once per machine: the library is cached in $ERNIE_STUDIO_CACHE/kernels, keyed by
source, compiler flags and CPU), and `layers.sdpa` then sends one-token bf16 attention to it. Where
it cannot be built (no C compiler, a CPU without AVX512-BF16) or ERNIE_STUDIO_CPU_KERNELS=0,
`ready` is False and torch's SDPA serves.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .hub import studio_cache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
SETTING = "ERNIE_STUDIO_CPU_KERNELS"  # "0" keeps torch's attention
MAX_GROUP, HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 32, 256  # the shapes the kernel takes


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def build(source: Path = SOURCE) -> ctypes.CDLL:
    """Compile `source` into a shared library (or reuse the cached one) and load it; raises
    OSError or CalledProcessError where it cannot."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler})")
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    target = studio_cache("kernels") / f"{source.stem}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], check=True, capture_output=True, text=True)
            os.replace(built, target)  # atomic: another process may build the same library
    library = ctypes.CDLL(str(target))
    library.decode_attention.restype = ctypes.c_int
    library.decode_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float]
    return library


def _load() -> ctypes.CDLL | None:
    if os.environ.get(SETTING, "1").lower() in ("0", "false", "off"):
        return None
    try:
        return build()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.info("decode attention kernel not built, torch's attention serves (%s)", str(detail).strip()[:300])
        return None


# Loaded at import, so that every model of the process takes the same path (and a compiled graph
# never meets a change of it); after the first build, that is a dlopen.
_library = _load()
ready = _library is not None  # a plain bool, which torch.compile reads as a constant


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel serves this one-token attention: q [1, H, 1, D], k [1, K, L, D], bf16 on
    the CPU, at most 8 query heads per key/value head."""
    B, H, _, D = q.shape
    # `ready` last: a traced graph of another shape or dtype then does not depend on it.
    return (q.device.type == "cpu" and q.dtype == k.dtype == torch.bfloat16 and B == 1
            and H // k.shape[1] <= MAX_GROUP and D % HEAD_DIM_MULTIPLE == 0 and D <= MAX_HEAD_DIM and ready)


@torch.library.custom_op("ernie_studio::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token q [1, H, 1, D] over the cached keys and values k, v [1, K, L, D]
    (views of a cache: rows of D contiguous elements, same strides), softmax scale 1/sqrt(D)."""
    _, H, _, D = q.shape
    K, L = k.shape[1], k.shape[2]
    if k.stride() != v.stride() or k.stride(3) != 1:
        raise ValueError("decode_attention needs keys and values with the same strides, rows contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    status = _library.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), K, H // K, D, L,
                                       k.stride(1), k.stride(2), D**-0.5)
    if status != 0:
        raise RuntimeError(f"decode_attention failed for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
