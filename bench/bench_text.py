"""Text generation speed: ours (bf16, int8), transformers and llama.cpp on the same weights.

Writes one random checkpoint at the real ERNIE 4.5 config (models.factory), then measures each
engine in a fresh subprocess (clean peak-memory figures), one after the other, and prints two
markdown tables:
  1. per engine (ours compiled as load_model does by default, or eager): time to first token of a 128- and a 2,048-token prompt, greedy decode tok/s
     after 128 and after 4,096 tokens of context, sampled decode tok/s (temperature 0.8, top-k 50,
     top-p 0.9), peak memory, and decode as a fraction of the memory-bandwidth bound (bandwidth
     measured here / weight bytes streamed per token);
  2. ours only, in a second process that serves as the app does (model and BatchGenerator built on a
     thread that ends): aggregate tok/s of 1/2/4/8 concurrent requests (continuous batching) while
     all of them decode and end to end, and the time to first token of a follow-up turn after
     3,000 tokens of history (KV prefix reuse).
llama.cpp runs when `--llama-cpp DIR` names the output of ../shared/tools/llamacpp-peer.sh
(DIR/bin/llama-bench, DIR/model-bf16.gguf, DIR/model-q8_0.gguf made from this checkpoint).

    python bench/bench_text.py --model 0.3b --device cpu --llama-cpp /tmp/peer
    python bench/bench_text.py --model 21b --device cuda --dir /dev/shm/ernie21b
    python bench/bench_text.py --model tiny   # seconds; what CI runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.factory import ERNIE_0_3B_CONFIG, ERNIE_21B_A3B_CONFIG, tiny_config, write_checkpoint  # noqa: E402

CONFIGS = {"0.3b": ERNIE_0_3B_CONFIG, "21b": ERNIE_21B_A3B_CONFIG, "tiny": tiny_config("dense")}
# Prompt lengths: (short, long, deep context, chat history); new tokens per timed run.
SIZES = {"full": dict(short=128, long=2048, deep=4096, history=3000, new=64),
         "tiny": dict(short=16, long=64, deep=128, history=100, new=8)}
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=0)
USERS = (1, 2, 4, 8)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(300, min(vocab, 100000), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stamps_of(tokens, device: str) -> list[float]:
    """Start time, then the time each token arrived."""
    sync(device)
    stamps = [time.perf_counter()]
    for _ in tokens:
        stamps.append(time.perf_counter())  # the token id is already on the host: synced
    return stamps


def figures(stamps: list[float]) -> tuple[float, float]:
    """(time to first token in ms, decode tok/s over the tokens after the first)."""
    decode = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
    return (stamps[1] - stamps[0]) * 1e3, decode


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure_ours(folder: str, device: str, dtype: torch.dtype, sizes: dict, quantize: str | None, compile_decode: bool | None,
                 quick: bool = False) -> dict:
    """As a library user: load_model (the decode step compiles in the background where it does by
    default; timed from the end of loading until it is ready), then generate."""
    from models import generate, load_model

    model = load_model(folder, device=device, dtype=dtype, quantize=quantize, compile_decode=compile_decode)
    loaded = time.perf_counter()
    if model.fast_decode is not None:  # every graph: the batched ones compile after the one-token one
        model.fast_decode.done.wait(timeout=900)
    compile_s = time.perf_counter() - loaded if model.fast_decode is not None and not model.fast_decode.failed else None
    vocab, new = model.config.vocab_size, sizes["new"]

    def run(n_prompt: int, new_tokens: int = new, seed: int = 0, **sampling) -> tuple[float, float]:
        prompt = random_prompt(vocab, n_prompt, seed)
        return figures(stamps_of(generate(model, prompt, new_tokens, eos_token_ids=[], **sampling), device))

    run(sizes["short"], 8)  # warm-up
    result = {"ttft_short_ms": run(sizes["short"])[0], "decode_tok_s": run(sizes["short"])[1],
              "sampled_tok_s": run(sizes["short"], **SAMPLED)[1], "bytes_per_token": weight_bytes(model),
              "compile_s": compile_s}
    if quick:
        return result
    result.update(ttft_long_ms=run(sizes["long"], 2)[0], decode_deep_tok_s=run(sizes["deep"])[1])
    return result


def measure_batching(folder: str, device: str, dtype: torch.dtype, sizes: dict, quantize: str | None,
                     compile_decode: bool | None) -> dict:
    """As the app serves: the model loaded and the `BatchGenerator` built on a thread that ends
    (ernie_app.manager.in_own_thread: no second OpenMP pool), requests from threads of their own."""
    from models import BatchGenerator, load_model

    made: dict = {}

    def load() -> None:
        made["model"] = model = load_model(folder, device=device, dtype=dtype, quantize=quantize, compile_decode=compile_decode)
        made["batcher"] = BatchGenerator(model, slots=max(USERS))

    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    model, batcher = made["model"], made["batcher"]
    if model.fast_decode is not None:
        model.fast_decode.done.wait(timeout=900)
    vocab, new = model.config.vocab_size, sizes["new"]
    result = {}
    list(batcher.generate(random_prompt(vocab, sizes["short"], 99), 8, eos_token_ids=[]))  # warm-up
    for users in USERS:
        stamps: list[list[float]] = [[] for _ in range(users)]

        def user(i: int) -> None:
            stamps[i] = stamps_of(batcher.generate(random_prompt(vocab, sizes["short"], 100 + i), new, eos_token_ids=[]), device)

        threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result[f"aggregate_{users}_tok_s"] = sum(len(s) - 1 for s in stamps) / (time.perf_counter() - started)
        # While every request decodes: from the last first token to the first last token.
        begin, end = max(s[1] for s in stamps), min(s[-1] for s in stamps)
        tokens = sum(begin < t <= end for s in stamps for t in s[2:])
        result[f"decoding_{users}_tok_s"] = tokens / (end - begin) if tokens else float("nan")  # nan: no overlap

    first_turn = random_prompt(vocab, sizes["short"], 7)
    result["ttft_first_turn_ms"] = figures(stamps_of(batcher.generate(first_turn, 2, eos_token_ids=[]), device))[0]
    history = random_prompt(vocab, sizes["history"], 8)
    reply = list(batcher.generate(history, new, eos_token_ids=[]))
    follow_up = history + reply + random_prompt(vocab, sizes["short"], 9)
    result["ttft_follow_up_ms"] = figures(stamps_of(batcher.generate(follow_up, 2, eos_token_ids=[]), device))[0]
    return result


def measure_transformers(folder: str, device: str, dtype: torch.dtype, sizes: dict) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    vocab = model.config.vocab_size

    def run(n_prompt: int, new_tokens: int = sizes["new"], **sampling) -> tuple[float, float]:
        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value: torch.Tensor) -> None:  # called with the prompt, then each new token
                sync(device)
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids = torch.tensor([random_prompt(vocab, n_prompt, 0)], device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=Clock(),
                           **(sampling or {"do_sample": False}))
        return figures([start, *stamps[1:]])

    run(sizes["short"], 8)
    sampled = {k: v for k, v in SAMPLED.items() if k != "seed"}
    return {"ttft_short_ms": run(sizes["short"])[0], "decode_tok_s": run(sizes["short"])[1],
            "ttft_long_ms": run(sizes["long"], 2)[0], "decode_deep_tok_s": run(sizes["deep"])[1],
            "sampled_tok_s": run(sizes["short"], **sampled)[1], "bytes_per_token": weight_bytes(model)}


def measure_llama_cpp(peer: str, quant: str, sizes: dict) -> dict:
    """llama-bench: prefill (pp) and decode (tg) rates, decode at depth; greedy only (it does not
    sample). Time to first token is the prompt's prefill time; a follow-up turn's, that of the new
    message after the history already in its KV cache (pp at depth)."""
    gguf = Path(peer) / f"model-{quant}.gguf"
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(peer) / "bin")}
    threads = str(torch.get_num_threads())

    def bench(*args: str) -> list[dict]:
        out = subprocess.run([str(Path(peer) / "bin" / "llama-bench"), "-m", str(gguf), "-t", threads, "-r", "2", "-o", "json", *args],
                             env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    rows = bench("-p", f"{sizes['short']},{sizes['long']}", "-n", str(sizes["new"]))
    deep = bench("-p", "0", "-n", str(sizes["new"]), "-d", str(sizes["deep"]))
    turns = bench("-p", str(sizes["short"] + 1), "-n", "0", "-d", f"0,{sizes['history'] + sizes['new'] - 1}")
    rate = {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in rows}
    first, follow_up = sorted(turns, key=lambda r: r["n_depth"])
    return {"ttft_first_turn_ms": first["avg_ns"] / 1e6, "ttft_follow_up_ms": follow_up["avg_ns"] / 1e6,
            "ttft_short_ms": sizes["short"] / rate[(sizes["short"], 0)] * 1e3, "decode_tok_s": rate[(0, sizes["new"])],
            "ttft_long_ms": sizes["long"] / rate[(sizes["long"], 0)] * 1e3, "decode_deep_tok_s": deep[0]["avg_ts"],
            "sampled_tok_s": float("nan"), "bytes_per_token": gguf.stat().st_size}


def measure(engine: str, args: argparse.Namespace) -> dict:
    """One engine (or, `--batching`, ours serving concurrent requests), in this process; its figures."""
    sizes, dtype = SIZES["tiny" if args.model == "tiny" else "full"], getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if engine.startswith("llama.cpp"):
        result = measure_llama_cpp(args.llama_cpp, engine.split("-", 1)[1], sizes)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    else:
        ours = (args.dir, args.device, dtype, sizes, "int8" if "int8" in engine else None, False if "eager" in engine else None)
        if engine == "transformers":
            result = measure_transformers(args.dir, args.device, dtype, sizes)
        elif args.batching:
            result = measure_batching(*ours)
        else:
            result = measure_ours(*ours, args.quick)
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"engine": engine, "peak_gib": peak, **result}


def best_of(results: list[dict]) -> dict:
    """Each figure's best over rounds: the highest rate, the lowest time or memory."""
    best = dict(results[0])
    for key, value in best.items():
        if isinstance(value, float) and not key == "bytes_per_token":
            values = [r[key] for r in results]
            best[key] = max(values) if key.endswith("tok_s") else min(values)
    return best


def memory_bandwidth(device: str) -> float:
    """Bytes/s of reading a 1 GiB fp32 tensor (best of 5 sums)."""
    x = torch.ones(2**28, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def print_tables(rows: list[dict], bandwidth: float, sizes: dict, title: str) -> None:
    nan = float("nan")
    print(f"\n{title}\n")
    s = sizes
    print(f"| engine | TTFT {s['short']} (ms) | TTFT {s['long']} (ms) | decode (tok/s) | decode at {s['deep']} ctx (tok/s) "
          f"| sampled decode (tok/s) | peak memory (GiB) | of bandwidth bound | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = bandwidth / r["bytes_per_token"]
        print(f"| {r['engine']} | {r['ttft_short_ms']:.0f} | {r.get('ttft_long_ms', nan):.0f} | {r['decode_tok_s']:.1f} | "
              f"{r.get('decode_deep_tok_s', nan):.1f} | {r['sampled_tok_s']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['decode_tok_s'] / bound:.0%} of {bound:.0f} tok/s | {r.get('compile_s') or 0:.0f} |")
    ours = [r for r in rows if "aggregate_1_tok_s" in r]
    if ours:
        print(f"\nConcurrent requests ({s['short']}-token prompts, {s['new']} new tokens each) through one BatchGenerator: "
              f"aggregate tok/s while all of them decode, then end to end (prefill included)\n")
        users = " | ".join(f"{u} user{'s' * (u > 1)}" for u in USERS)
        print(f"| engine | decoding: {users} | {USERS[-1]} / 1 | end to end: {users} | {USERS[-1]} / 1 |")
        print("|---|" + "---|" * (2 * len(USERS) + 2))
        for r in ours:
            cells = []
            for kind in ("decoding", "aggregate"):
                rates = [r[f"{kind}_{u}_tok_s"] for u in USERS]
                cells += [f"{a:.1f}" for a in rates] + [f"{rates[-1] / rates[0]:.1f}x"]
            print(f"| {r['engine']} | " + " | ".join(cells) + " |")
    turns = [r for r in rows if "ttft_follow_up_ms" in r]
    if turns:
        print(f"\nA follow-up turn: time to first token of a {s['short']}-token message after {s['history']:,} tokens of "
              f"history and a {s['new']}-token reply held in the KV cache, against the same message as a first turn\n")
        print("| engine | TTFT first turn (ms) | TTFT follow-up (ms) | follow-up / first |\n|---|---|---|---|")
        for r in turns:
            print(f"| {r['engine']} | {r['ttft_first_turn_ms']:.0f} | {r['ttft_follow_up_ms']:.0f} | "
                  f"{r['ttft_follow_up_ms'] / r['ttft_first_turn_ms']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CONFIGS, default="0.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engines", default=None, help="comma-separated; default: ours, ours-int8 (CPU), transformers, llama.cpp-bf16/-q8_0 (with --llama-cpp)")
    parser.add_argument("--llama-cpp", default=None, help="output folder of ../shared/tools/llamacpp-peer.sh for this checkpoint")
    parser.add_argument("--dir", default=None, help="where to write the random checkpoint (reused if present)")
    parser.add_argument("--rounds", type=int, default=1, help="run the engines this many times, alternating; best figure of each")
    parser.add_argument("--quick", action="store_true", help="only batch-1 decode (greedy and sampled) and the short TTFT")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one engine
    parser.add_argument("--batching", action="store_true", help=argparse.SUPPRESS)  # internal: its concurrency part
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"ernie-bench-{args.model}")
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_checkpoint(folder, CONFIGS[args.model], max_shard_bytes=5 * 2**30, tokenizer=False)
        print(f"wrote random checkpoint to {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    engines = args.engines.split(",") if args.engines else [
        "ours", *(["ours-int8", "ours-eager", "ours-int8-eager"] if args.device == "cpu" else []), "transformers",
        *(["llama.cpp-bf16", "llama.cpp-q8_0"] if args.llama_cpp else [])]
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for round_ in range(args.rounds):
        for engine in engines:
            command = [sys.executable, __file__, "--one", engine, "--dir", str(folder), "--model", args.model,
                       "--device", args.device, "--dtype", args.dtype, *(["--quick"] if args.quick else []),
                       *(["--llama-cpp", args.llama_cpp] if args.llama_cpp else [])]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            if engine.startswith("ours") and not args.quick:  # serving concurrent requests: a process of its own
                out = subprocess.run([*command, "--batching"], check=True, capture_output=True, text=True).stdout
                result.update({k: v for k, v in json.loads(out.splitlines()[-1]).items() if k not in result})
            runs[engine].append(result)
            print(f"measured {engine}, round {round_ + 1}", file=sys.stderr)
    rows = [best_of(results) for results in runs.values()]
    versions = f"torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    bandwidth = memory_bandwidth(args.device)  # after the engines: the machine as they left it
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    sizes = SIZES["tiny" if args.model == "tiny" else "full"]
    print_tables(rows, bandwidth, sizes, f"ERNIE-4.5 {args.model} random weights, {args.dtype} activations, {device_name}, "
                 f"{versions}; {sizes['new']} new tokens per run, greedy unless sampled; best of {args.rounds} round(s); "
                 f"memory bandwidth {bandwidth / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
