"""One compiled decode step of the 0.3B by rows (requests decoding together): the time of each
graph of `models.compiled` at its own row count, and of the ways larger batches could run (one
graph of 8 rows, or two of 4), in bf16 and int8, side by side in one process per dtype. This is
what chose the row counts (ROW_BUCKETS, INT8_ROW_BUCKETS).

    python bench/bench_decode_rows.py --dir /tmp/ernie-bench-0.3b
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import compiled, load_model  # noqa: E402
from models.layers import BatchStep  # noqa: E402

CONTEXT = 128  # cached tokens of every request when the timing starts


def measure(folder: str, quantize: str | None, steps: int) -> None:
    """Print one table row per way of running a step, for one dtype (in a process of its own)."""
    # Every bucket (int8 too), so that the ways not taken are measured as well.
    compiled.INT8_ROW_BUCKETS = compiled.ROW_BUCKETS
    made: dict = {}

    def load() -> None:  # as the app loads: on a thread that ends (one live OpenMP pool)
        model = load_model(folder, device="cpu", dtype=torch.bfloat16, quantize=quantize, compile_decode=False)
        model.fast_decode = compiled.CompiledDecode(model, background=False)
        made["model"] = model

    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    model = made["model"]
    fast = model.fast_decode
    assert fast.failed is None, fast.failed
    ways = {f"{rows} row{'s' * (rows > 1)}, 1 step": [(rows, rows)] for rows in compiled.ROW_BUCKETS}
    ways["8 rows as 2 steps of 4"] = [(4, 4), (4, 4)]
    dtype = quantize or "bf16"

    def run() -> None:
        with torch.inference_mode():  # caches made here: zero-filled on the main thread, they would start a second pool
            caches = [model.new_cache(1, CONTEXT + len(ways) * (steps + 3)) for _ in range(8)]
            for cache in caches:
                model(torch.randint(300, 1000, (1, CONTEXT)), cache=cache, start=0)
            position = CONTEXT
            for way, calls in ways.items():
                times = []
                for i in range(steps + 3):
                    start, first = time.perf_counter(), 0
                    for rows, graph in calls:
                        group = caches[first : first + rows]
                        fast._run(BatchStep([(c, position, 1) for c in group]), torch.randint(300, 1000, (rows,)), graph)
                        first += rows
                    position += 1
                    if i >= 3:
                        times.append(time.perf_counter() - start)
                step = sorted(times)[len(times) // 2]
                print(f"| {dtype} | {way} | {step * 1e3:.1f} | {first / step:.1f} |", flush=True)

    errors: list[BaseException] = []

    def guarded() -> None:  # a thread's exception would not reach this process's exit code
        try:
            run()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=guarded)  # the load's thread has ended: still one OpenMP pool
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="a checkpoint folder (bench_text.py writes one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one dtype
    args = parser.parse_args()
    if args.one:
        measure(args.dir, None if args.one == "bf16" else args.one, args.steps)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {CONTEXT} cached tokens per request; "
          "median step time\n")
    print("| weights | way | step (ms) | tok/s |\n|---|---|---|---|")
    for dtype in ("bf16", "int8"):
        subprocess.run([sys.executable, __file__, "--dir", args.dir, "--steps", str(args.steps), "--one", dtype], check=True)


if __name__ == "__main__":
    main()
