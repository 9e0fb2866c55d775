"""Numerical drift of the fast paths against plain bf16, on the same random checkpoint:

- int8 weight-only (`load_model(..., quantize="int8")`) against bf16: logits (relative error,
  top-1 agreement per position over prompts) and greedy tokens;
- requests decoded together (`BatchGenerator`, bf16) against each alone: greedy tokens.

    python bench/bench_drift.py --dir /tmp/ernie-bench-0.3b      # the real 0.3B config
    python bench/bench_drift.py --model tiny                    # seconds
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import BatchGenerator, generate, load_model  # noqa: E402
from models.factory import ERNIE_0_3B_CONFIG, tiny_config, write_checkpoint  # noqa: E402

CONFIGS = {"0.3b": ERNIE_0_3B_CONFIG, "tiny": tiny_config("dense")}


def prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(300, min(vocab, 100000), (length,), generator=generator).tolist() for _ in range(count)]


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CONFIGS, default="0.3b")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"ernie-bench-{args.model}")
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, CONFIGS[args.model], max_shard_bytes=5 * 2**30, tokenizer=False)
    bf16 = load_model(folder, device="cpu", dtype=torch.bfloat16, compile_decode=False)
    int8 = load_model(folder, device="cpu", dtype=torch.bfloat16, quantize="int8", compile_decode=False)
    batch = prompts(bf16.config.vocab_size, args.prompts, 64)
    n = args.new_tokens

    errors, top1 = [], []
    for ids in batch:
        reference, quantised = (m(torch.tensor([ids])).float()[0] for m in (bf16, int8))
        errors.append(((quantised - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item())
        top1.append((quantised.argmax(-1) == reference.argmax(-1)).float().mean().item())
    alone = [list(generate(bf16, ids, n, eos_token_ids=[])) for ids in batch]
    quantised_tokens = [list(generate(int8, ids, n, eos_token_ids=[])) for ids in batch]

    together: list[list[int] | None] = [None] * len(batch)
    batcher = BatchGenerator(bf16, slots=len(batch))

    def run(i: int) -> None:
        together[i] = list(batcher.generate(batch[i], n, eos_token_ids=[]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def summary(tokens: list[list[int]]) -> str:
        same = [agreement(a, b) for a, b in zip(alone, tokens)]
        return f"{sum(s == n for s in same)}/{len(batch)} identical; first difference after {sorted(same)} tokens"

    print(f"\n{args.model} random weights, {len(batch)} prompts of 64 tokens, {n} greedy tokens each, CPU {torch.get_num_threads()} threads\n")
    print("| comparison | result |")
    print("|---|---|")
    print(f"| int8 vs bf16 logits: mean relative error (L2, per position) | {sum(errors) / len(errors):.4f} |")
    print(f"| int8 vs bf16 logits: top-1 agreement over prompt positions | {sum(top1) / len(top1):.1%} |")
    print(f"| int8 vs bf16 greedy tokens | {summary(quantised_tokens)} |")
    print(f"| bf16 batched ({len(batch)} together) vs alone, greedy tokens | {summary(together)} |")


if __name__ == "__main__":
    main()
