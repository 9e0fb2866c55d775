"""Peak host memory while loading a checkpoint: ours against transformers' from_pretrained.

Each loader runs in a fresh subprocess; a thread samples /proc/self/status every 2 ms for the
anonymous (RssAnon: real copies) and file-backed (RssFile: mmapped safetensors pages, shared with
the page cache and dropped under pressure) resident memory.

    python bench/bench_load_memory.py            # the real 0.3B config, bf16 file, loaded as bf16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """Anonymous and file-backed resident memory (KiB) of a process, this one by default."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def measure(loader: str, folder: str) -> dict:
    import torch

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in rss_kib().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.002)

    before = rss_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if loader == "ours":
        from models import load_model

        model = load_model(folder, device="cpu", dtype=torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mib = 1 / 1024
    return {
        "loader": loader,
        "seconds": seconds,
        "weights_mib": weights / 2**20,
        "anon_before_mib": before["RssAnon"] * mib,
        "anon_peak_mib": peak["RssAnon"] * mib,
        "file_peak_mib": peak["RssFile"] * mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "ernie-bench-0.3b"))
    parser.add_argument("--loaders", default="ours,transformers")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.dir)))
        return
    from models.factory import ERNIE_0_3B_CONFIG, write_checkpoint

    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, ERNIE_0_3B_CONFIG, tokenizer=False)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"checkpoint {folder}: {size:.0f} MiB of safetensors, loaded on CPU as bf16\n")
    print("| loader | load time (s) | weights (MiB) | anonymous RSS before → peak (MiB) | extra over weights (MiB) | peak file-backed RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for loader in args.loaders.split(","):
        command = [sys.executable, __file__, "--one", loader, "--dir", str(folder)]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        extra = r["anon_peak_mib"] - r["anon_before_mib"] - r["weights_mib"]
        print(f"| {r['loader']} | {r['seconds']:.2f} | {r['weights_mib']:.0f} | {r['anon_before_mib']:.0f} → "
              f"{r['anon_peak_mib']:.0f} | {extra:.0f} | {r['file_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
