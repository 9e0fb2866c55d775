"""Zero-shot classification throughput: ours against transformers 4.56.2's pipeline, same weights.

Writes one random ErnieM NLI checkpoint at the real base size (hub layout: config.json,
pytorch_model.bin, vocab.txt, sentencepiece.bpe.model), then alternates rounds of ours and of the
reference (transformers 4.56.2 in the venv the tests build, tests/ernie_m_reference.py) on the same
text: requests/s for 3 and 20 labels, each request one batched forward pass. Prints a markdown table.

    python bench/bench_classify.py              # base size (278M parameters), CPU
    python bench/bench_classify.py --tiny       # seconds; what CI runs so that the script cannot rot
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from models import load_tokenizer  # noqa: E402
from models.factory import ERNIE_M_LARGE_NLI_CONFIG, tiny_ernie_m_config, write_ernie_m_checkpoint  # noqa: E402

BASE = {**ERNIE_M_LARGE_NLI_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12}
TEXT = ("The city council approved a new budget on Tuesday that raises spending on public transport and "
        "schools, while cutting funds for road construction over the next three years.")
LABELS = ["politics", "economy", "sports", "technology", "health", "culture", "weather", "science", "travel",
          "education", "crime", "business", "music", "film", "food", "fashion", "religion", "history",
          "environment", "war"]
REFERENCE = """
import json, sys, time, torch
from transformers import pipeline
folder, repeats, sizes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(torch.get_num_threads())
classify = pipeline("zero-shot-classification", model=folder, device="cpu")
text, labels = json.loads(sys.argv[4])
out = {}
for n in sizes:
    classify(text, labels[:n])
    start = time.perf_counter()
    for _ in range(repeats):
        classify(text, labels[:n])
    out[n] = repeats / (time.perf_counter() - start)
print(json.dumps(out))
"""


def run_ours(folder: Path, dtype: torch.dtype, repeats: int, sizes: list[int]) -> dict[int, float]:
    from models import load_model, zero_shot_classify

    model, tokenizer = load_model(folder, device="cpu", dtype=dtype), load_tokenizer(folder)
    rates = {}
    for n in sizes:
        zero_shot_classify(model, tokenizer, TEXT, LABELS[:n])
        start = time.perf_counter()
        for _ in range(repeats):
            zero_shot_classify(model, tokenizer, TEXT, LABELS[:n])
        rates[n] = repeats / (time.perf_counter() - start)
    return rates


def run_reference(folder: Path, repeats: int, sizes: list[int]) -> dict[int, float]:
    from ernie_m_reference import reference_python

    result = subprocess.run([str(reference_python()), "-c", REFERENCE, str(folder), str(repeats), json.dumps(sizes),
                             json.dumps([TEXT, LABELS])], capture_output=True, text=True, check=True)
    return {int(n): rate for n, rate in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each engine")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.tiny else 5)
    sizes = [3, 20]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_ernie_m_checkpoint(Path(tmp) / "ernie-m", tiny_ernie_m_config() if args.tiny else BASE)
        engines = {"ours fp32": lambda: run_ours(folder, torch.float32, repeats, sizes),
                   "transformers 4.56.2 pipeline fp32": lambda: run_reference(folder, repeats, sizes)}
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else bf16 matmuls are emulated, ~7x slower
            engines["ours bf16"] = lambda: run_ours(folder, torch.bfloat16, repeats, sizes)
        pair_tokens = len(load_tokenizer(folder).encode(TEXT, f"This example is {LABELS[0]}."))
        results: dict[str, list[dict[int, float]]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, run in engines.items():
                results[name].append(run())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'tiny' if args.tiny else 'base-size'} ErnieM, "
          f"{repeats} requests per figure, {args.rounds} alternating rounds, {pair_tokens} tokens per (text, hypothesis) pair")
    print("\n| engine | requests/s, 3 labels | requests/s, 20 labels |\n|---|---|---|")
    for name, rounds in results.items():
        cells = [" / ".join(f"{r[n]:.2f}" for r in rounds) for n in sizes]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
