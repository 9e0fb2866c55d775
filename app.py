"""ERNIE 4.5 Studio: `python app.py` starts the web app (see README for flags and env vars)."""
from __future__ import annotations

import argparse
import logging
import os

import gradio as gr

from ernie_app.conversation import Limits
from ernie_app.demo import demo_models, hub_reachable, weights_cached
from ernie_app.manager import QUANTIZE_SETTINGS, ModelManager
from ernie_app.registry import CHAT, build_registry, models_for, parse_model_entries
from ernie_app.ui import build_app
from ernie_app.uploads import MB

log = logging.getLogger("ernie_studio")


def env(name: str, default: str | int | None = None) -> str | int | None:
    return os.environ.get(f"ERNIE_STUDIO_{name}", default)


def env_flag(name: str) -> bool:
    return str(env(name, "")).lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default=env("HOST", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")),
                   help="address to listen on (ERNIE_STUDIO_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))),
                   help="port (ERNIE_STUDIO_PORT; default 7860)")
    p.add_argument("--share", action="store_true", default=env_flag("SHARE"), help="create a public gradio.live link (ERNIE_STUDIO_SHARE)")
    p.add_argument("--models", default=env("MODELS", ""),
                   help="extra or overriding models, comma-separated NAME=SOURCE or SOURCE, SOURCE a hub id, a local folder "
                        "or an OpenAI-compatible engine's http://HOST:PORT/v1[#served-id] (ERNIE_STUDIO_MODELS)")
    p.add_argument("--default-model", default=env("DEFAULT_MODEL"), help="model selected at start (ERNIE_STUDIO_DEFAULT_MODEL)")
    p.add_argument("--demo", action="store_true", default=env_flag("DEMO"),
                   help="serve tiny random-weight checkpoints; no download (ERNIE_STUDIO_DEMO)")
    p.add_argument("--max-context", type=int, default=int(env("MAX_CONTEXT", 32768)),
                   help="longest conversation in tokens, prompt plus reply (ERNIE_STUDIO_MAX_CONTEXT; default 32768)")
    p.add_argument("--concurrency", type=int, default=int(env("CONCURRENCY", 8)),
                   help="simultaneous generations per model, decoded as one batch (ERNIE_STUDIO_CONCURRENCY; default 8)")
    p.add_argument("--quantize", choices=QUANTIZE_SETTINGS, default=env("QUANTIZE", "auto"),
                   help="CPU weight format: int8 (weight-only), none (bf16/fp32), auto = int8 for chat models (ERNIE_STUDIO_QUANTIZE)")
    p.add_argument("--request-timeout", type=float, default=float(env("REQUEST_TIMEOUT", 600)),
                   help="seconds a chat turn may take, waiting for a slot included (ERNIE_STUDIO_REQUEST_TIMEOUT; default 600)")
    p.add_argument("--per-user-limit", type=int, default=int(env("PER_USER_LIMIT", 2)),
                   help="requests one client session may run at once (ERNIE_STUDIO_PER_USER_LIMIT; default 2)")
    p.add_argument("--auth", default=env("AUTH", ""),
                   help="USER:PASSWORD[,USER:PASSWORD...] required to open the app; prefer the ERNIE_STUDIO_AUTH variable, "
                        "which `ps` does not show")
    p.add_argument("--queue-size", type=int, default=int(env("QUEUE_SIZE", 64)),
                   help="requests waiting in the queue before new ones are turned away (ERNIE_STUDIO_QUEUE_SIZE; default 64)")
    p.add_argument("--cpu-limit-gb", type=float, default=env("CPU_LIMIT_GB"),
                   help="largest total memory of the models kept on the CPU, weights and KV caches (ERNIE_STUDIO_CPU_LIMIT_GB; default half the RAM)")
    p.add_argument("--max-upload-mb", type=float, default=float(env("MAX_UPLOAD_MB", 200)),
                   help="largest file a user may upload, in MB (ERNIE_STUDIO_MAX_UPLOAD_MB; default 200)")
    p.add_argument("--preload", action="store_true", default=env_flag("PRELOAD"), help="load the default model at start (ERNIE_STUDIO_PRELOAD)")
    return p.parse_args(argv)


def max_upload_bytes(args: argparse.Namespace) -> int:
    return int(args.max_upload_mb * MB)


def choose_models(args: argparse.Namespace) -> tuple[dict, str]:
    """The registry to serve and a notice for the page. Demo mode when asked, or when the hub is
    out of reach and no configured model has local weights."""
    extra = parse_model_entries(args.models)
    if args.demo:
        return build_registry(demo_models() + extra, include_defaults=False), "Demo mode: tiny models with random weights; replies are gibberish by design."
    registry = build_registry(extra)
    if any(weights_cached(spec) for spec in registry.values()) or hub_reachable():
        return registry, ""
    log.warning("Hugging Face hub unreachable and no local weights: starting in demo mode")
    notice = ("The Hugging Face hub cannot be reached and no local weights are configured, so the app runs in demo "
              "mode: tiny models with random weights. Point --models at local checkpoints for real answers.")
    return build_registry(demo_models() + extra, include_defaults=False), notice


def parse_auth(text: str) -> list[tuple[str, str]] | None:
    """USER:PASSWORD pairs for Gradio's login page; None when no authentication is asked for."""
    pairs = [entry.strip().partition(":") for entry in text.split(",") if entry.strip()]
    if any(not user or not sep or not password for user, sep, password in pairs):
        raise SystemExit("--auth / ERNIE_STUDIO_AUTH takes USER:PASSWORD pairs separated by commas")
    return [(user, password) for user, _, password in pairs] or None


def create_app(args: argparse.Namespace) -> gr.Blocks:
    """The app `python app.py` serves, queued and ready to launch."""
    registry, notice = choose_models(args)
    chat_models = models_for(registry, CHAT)
    default_model = args.default_model if args.default_model in chat_models else chat_models[0]
    cpu_limit = None if args.cpu_limit_gb is None else int(float(args.cpu_limit_gb) * 2**30)
    manager = ModelManager(registry, cpu_limit_bytes=cpu_limit, max_concurrency=args.concurrency, quantize=args.quantize)
    if args.preload and not registry[default_model].remote:
        manager.get(default_model)
    limits = Limits(max_context=args.max_context, request_timeout=args.request_timeout, per_user=args.per_user_limit,
                    max_upload_bytes=max_upload_bytes(args))
    app = build_app(manager, default_model, notice, limits, concurrency_limit=args.concurrency * len(registry))
    return app.queue(max_size=args.queue_size)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    if auth is None and (args.share or args.host not in ("127.0.0.1", "localhost", "::1")):
        log.warning("serving on %s without authentication: anyone who can reach it can use it (set ERNIE_STUDIO_AUTH)",
                    "a public share link" if args.share else args.host)
    create_app(args).launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                            max_file_size=max_upload_bytes(args))


if __name__ == "__main__":
    main()
