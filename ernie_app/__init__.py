"""ERNIE 4.5 Studio: the Gradio app around the models in `models/`."""
import ctypes


def bound_malloc() -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what
    is freed in it; the server's worker threads, each running VL turns, strand hundreds of MiB so
    (BENCHMARKS.md "Load"). Two arenas, and blocks of 1 MiB or more (tensors) mapped apart and
    handed back when freed, keep the memory flat. Set at import, before any worker thread."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(-8, 2)  # M_ARENA_MAX
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed one: glibc no longer raises it past large frees)


bound_malloc()
