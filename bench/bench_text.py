"""Ours against transformers on the same random weights at the real ERNIE 4.5 text configs.

Writes one random checkpoint in the official layout (models.factory), then runs each engine in a
fresh subprocess (clean peak-memory figures) on the same files: load time, time to first token,
batch-1 greedy decode tokens/s, peak memory. Prints a markdown table.

    python bench/bench_text.py --model 0.3b --device cpu
    python bench/bench_text.py --model 21b --device cuda --dir /dev/shm/ernie21b
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.factory import ERNIE_0_3B_CONFIG, ERNIE_21B_A3B_CONFIG, write_checkpoint  # noqa: E402

CONFIGS = {"0.3b": ERNIE_0_3B_CONFIG, "21b": ERNIE_21B_A3B_CONFIG}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(folder: str, device: str, dtype: torch.dtype, prompt: list[int], new_tokens: int) -> list[float]:
    from models import generate, load_model

    model = load_model(folder, device=device, dtype=dtype)
    stamps = []

    def timed_run() -> None:
        stamps.clear()
        sync(device)
        stamps.append(time.perf_counter())
        for _ in generate(model, prompt, new_tokens, eos_token_ids=[]):
            stamps.append(time.perf_counter())  # the token id is already on the host: synced

    timed_run()  # warm-up
    timed_run()
    return stamps


def run_transformers(folder: str, device: str, dtype: torch.dtype, prompt: list[int], new_tokens: int) -> list[float]:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:  # called with the prompt, then each new token
            sync(device)
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt], device=device)

    def timed_run() -> None:
        stamps.clear()
        sync(device)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=Clock())

    timed_run()
    timed_run()
    return stamps


ENGINES = {"ours": run_ours, "transformers": run_transformers}


def measure(engine: str, folder: str, device: str, dtype: str, prompt_len: int, new_tokens: int) -> dict:
    """One engine, in this process; returns the figures as a dict."""
    torch.manual_seed(0)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(300, min(vocab, 100000), (prompt_len,)).tolist()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stamps = ENGINES[engine](folder, device, getattr(torch, dtype), prompt, new_tokens)
    first, last = stamps[1], stamps[-1]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "engine": engine,
        "ttft_ms": (first - stamps[0]) * 1e3,
        "decode_tok_s": (len(stamps) - 2) / (last - first),
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CONFIGS, default="0.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engines", default="ours,transformers")
    parser.add_argument("--dir", default=None, help="where to write the random checkpoint (reused if present)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one engine
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    if args.one:
        print(json.dumps(measure(args.one, args.dir, args.device, dtype, args.prompt_len, args.new_tokens)))
        return

    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"ernie-bench-{args.model}")
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_checkpoint(folder, CONFIGS[args.model], max_shard_bytes=5 * 2**30, tokenizer=False)
        print(f"wrote random checkpoint to {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--one", engine, "--dir", str(folder), "--device", args.device,
                   "--dtype", dtype, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    versions = f"torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nERNIE-4.5 {args.model} random weights, {dtype}, {device_name}, {versions}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch 1, greedy\n")
    memory = "peak GPU memory (GiB)" if args.device.startswith("cuda") else "peak RSS (GiB)"
    print(f"| engine | time to first token (ms) | decode (tok/s) | {memory} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
