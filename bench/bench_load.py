"""Load: concurrent API users on the running app; latency per endpoint, failures, server memory.

Starts `python app.py --demo` on a free port (or attaches to --url), warms every endpoint of
--mix once (the models load on first use), then each user calls the endpoints of --mix in turn
until the time is up. Without --growing each request starts a fresh conversation (a new session,
which ends with the request, as a browser tab opened for one question does); with it each user
keeps one session whose conversations grow turn by turn, as a person chatting on does. The server's resident memory (VmRSS from /proc;
--pid when attached to a server started elsewhere) is sampled throughout: it should stay flat.
The app's own settings come from its ERNIE_STUDIO_* variables (e.g. ERNIE_STUDIO_COMPILE=0).

    python bench/bench_load.py --users 8 --minutes 5 --mix chat,image,video,classify
    python bench/bench_load.py --users 8 --minutes 5 --mix chat --growing --json /tmp/load.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_load_memory import rss_kib  # noqa: E402

ENDPOINTS = ("chat", "image", "video", "classify")
MEDIA = {"image": ROOT / "assets" / "shapes.png", "video": ROOT / "assets" / "clock.mp4"}
QUESTIONS = ("Tell me about the sea.", "用一句话介绍北京。", "What should I read next?", "Explain lists and tuples.")
CLASSIFY_TEXTS = ("国家队昨晚在决赛中以二比一战胜对手。", "El gobierno aprobó una nueva ley de educación.",
                  "Oil prices rose after the production cut.")
LABELS = "sports, politics, economy, technology"
ERRORS_KEPT = 5


@dataclass
class Stats:
    """What the users saw: latencies of the requests served and the failures, per endpoint."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    failures: dict[str, int] = field(default_factory=lambda: {e: 0 for e in ENDPOINTS})
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, seconds: float, error: Exception | None) -> None:
        with self.lock:
            if error is None:
                self.latencies[endpoint].append(seconds)
                return
            self.failures[endpoint] += 1
            if len(self.errors) < ERRORS_KEPT:
                self.errors.append(f"/{endpoint}: {type(error).__name__}: {str(error)[:300]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer at {url} within {seconds:.0f} s")


@contextmanager
def demo_server(log_path: Path) -> Iterator[tuple[str, int]]:
    """`python app.py --demo` on a free port: (its URL, its pid), stopped on exit; offline."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "app.py", "--demo", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, server)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def call(client: Client, endpoint: str, turn: int, growing: bool, max_new_tokens: int) -> None:
    """One request; `turn` counts this user's earlier requests to the endpoint. A growing
    conversation attaches its image or video once, at its first turn (follow-ups see it)."""
    question = QUESTIONS[turn % len(QUESTIONS)]
    if endpoint == "chat":
        client.predict(question, max_new_tokens=max_new_tokens, api_name="/chat")
    elif endpoint == "classify":
        client.predict(CLASSIFY_TEXTS[turn % len(CLASSIFY_TEXTS)], LABELS, api_name="/classify")
    else:
        media = handle_file(str(MEDIA[endpoint])) if turn == 0 or not growing else None
        frames = {"fps": 1.0, "max_frames": 4} if endpoint == "video" else {}
        client.predict(media, question, max_new_tokens=max_new_tokens, **frames, api_name=f"/{endpoint}")


@contextmanager
def fresh_session(client: Client) -> Iterator[None]:
    """A new session of `client`, held as a browser tab holds its own: by the heartbeat
    connection, whose end tells the server that the session is over. (The client's own heartbeat
    follows a reset_session only at its next beat, 15 s later.)"""
    client.reset_session()
    with httpx.stream("GET", client.heartbeat_url.format(session_hash=client.session_hash), timeout=None):
        yield


def user(client: Client, index: int, mix: list[str], growing: bool, max_new_tokens: int, deadline: float,
         stats: Stats) -> None:
    """Call the endpoints of `mix` in turn (each user from its own offset) until the deadline."""
    turns = dict.fromkeys(mix, 0)
    n = index
    while time.monotonic() < deadline:
        endpoint = mix[n % len(mix)]
        n += 1
        began = time.perf_counter()
        try:
            with nullcontext() if growing else fresh_session(client):
                call(client, endpoint, turns[endpoint], growing, max_new_tokens)
            error = None
        except Exception as failure:  # a failed request is counted and reported, not fatal
            error = failure
        stats.record(endpoint, time.perf_counter() - began, error)
        turns[endpoint] += 1


def server_rss_mib(pid: int) -> float:
    return sum(rss_kib(pid).values()) / 1024


def sample_rss(pid: int, began: float, every: float, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since `began`, server RSS in MiB) now, every `every` seconds, and at `stop`."""
    def take() -> None:
        samples.append((time.monotonic() - began, server_rss_mib(pid)))

    take()
    while not stop.wait(every):
        take()
    take()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (nan when there is no value)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def run(url: str, pid: int | None, users: int, seconds: float, mix: list[str], growing: bool,
        max_new_tokens: int) -> dict:
    """Warm up, drive `users` concurrent clients for `seconds`, and return the results."""
    warm = Client(url, verbose=False)
    for endpoint in mix:
        call(warm, endpoint, 0, growing, max_new_tokens)
    warm.close()
    clients = [Client(url, verbose=False) for _ in range(users)]
    stats, samples, stop = Stats(), [], threading.Event()
    began = time.monotonic()
    threads = [threading.Thread(target=user, args=(client, i, mix, growing, max_new_tokens, began + seconds, stats))
               for i, client in enumerate(clients)]
    sampler = threading.Thread(target=sample_rss, args=(pid, began, max(1.0, seconds / 60), stop, samples))
    if pid is not None:
        sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    for client in clients:
        client.close()
    stop.set()
    if pid is not None:
        sampler.join()
    per_endpoint = {e: {"served": len(stats.latencies[e]), "failed": stats.failures[e],
                        "p50_s": percentile(stats.latencies[e], 50), "p95_s": percentile(stats.latencies[e], 95)}
                    for e in mix}
    everything = [t for e in mix for t in stats.latencies[e]]
    overall = {"served": len(everything), "failed": sum(stats.failures.values()),
               "p50_s": percentile(everything, 50), "p95_s": percentile(everything, 95)}
    return {"users": users, "seconds": elapsed, "mix": mix, "growing": growing, "max_new_tokens": max_new_tokens,
            "endpoints": per_endpoint, "overall": overall, "errors": stats.errors, "rss_mib": samples}


def report(result: dict) -> str:
    """The results as markdown: requests and latency per endpoint, then the server's RSS."""
    conversation = "growing conversation per user" if result["growing"] else "fresh conversation per request"
    lines = [f"{result['users']} users x {result['seconds']:.0f} s, {','.join(result['mix'])}, {conversation}, "
             f"max {result['max_new_tokens']} new tokens", "",
             "| endpoint | served | failed | req/s | p50 (s) | p95 (s) |", "|---|---|---|---|---|---|"]
    for name, row in [*((f"/{e}", r) for e, r in result["endpoints"].items()), ("all", result["overall"])]:
        lines.append(f"| {name} | {row['served']} | {row['failed']} | {row['served'] / result['seconds']:.2f} | "
                     f"{row['p50_s']:.2f} | {row['p95_s']:.2f} |")
    samples = result["rss_mib"]
    if samples:
        points = sorted({round(i * (len(samples) - 1) / 6) for i in range(7)})
        lines += ["", "| server RSS | start | " + " | ".join(f"{samples[i][0]:.0f} s" for i in points[1:-1])
                  + " | end | max |", "|---" * (len(points) + 2) + "|",
                  "| MiB | " + " | ".join(f"{samples[i][1]:.0f}" for i in points) + f" | {max(r for _, r in samples):.0f} |"]
    if result["errors"]:
        lines += ["", "First errors:", *(f"- {error}" for error in result["errors"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="attach to this running app instead of starting one")
    parser.add_argument("--pid", type=int, help="the attached app's process id, to sample its memory")
    parser.add_argument("--users", type=int, default=8)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--mix", default="chat", help=f"endpoints called in turn, comma-separated: {','.join(ENDPOINTS)}")
    parser.add_argument("--growing", action="store_true", help="one growing conversation per user, not a fresh one per request")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    mix = [e.strip().lstrip("/") for e in args.mix.split(",") if e.strip()]
    if unknown := set(mix) - set(ENDPOINTS):
        parser.error(f"unknown endpoints {sorted(unknown)}; choose from {','.join(ENDPOINTS)}")
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 1)
    settings = (args.users, seconds, mix, args.growing, args.max_new_tokens)
    if args.url:
        result = run(args.url, args.pid, *settings)
    else:
        log = Path(tempfile.gettempdir()) / f"bench-load-{os.getpid()}.log"
        try:
            with demo_server(log) as (url, pid):
                result = run(url, pid, *settings)
        except BaseException:
            sys.stderr.write(f"server log ({log}):\n{log.read_text()[-4000:]}\n")
            raise
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
