"""Command line, environment variables and the automatic demo mode of app.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client

import app
from ernie_app.registry import DEFAULT_MODELS

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags_have_env_equivalents(monkeypatch):
    monkeypatch.setenv("ERNIE_STUDIO_PORT", "9999")
    monkeypatch.setenv("ERNIE_STUDIO_MODELS", "mine=/models/ernie")
    monkeypatch.setenv("ERNIE_STUDIO_DEMO", "1")
    args = app.parse_args([])
    assert (args.port, args.models, args.demo) == (9999, "mine=/models/ernie", True)
    assert app.parse_args(["--port", "7000"]).port == 7000  # the flag wins over the variable


def test_demo_mode_is_automatic_without_hub_or_local_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry, notice = app.choose_models(app.parse_args([]))
    assert list(registry) == [m.name for m in DEFAULT_MODELS]  # the real names, in every mode
    assert all(spec.random_weights for spec in registry.values())
    assert "demo mode" in notice and "random weights" in notice


def test_local_weights_disable_the_automatic_demo(monkeypatch, demo_registry, demo_names):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = demo_registry[demo_names[0]].source
    registry, notice = app.choose_models(app.parse_args(["--models", f"{DEFAULT_MODELS[0].name}={local}"]))
    assert notice == ""
    assert registry[DEFAULT_MODELS[0].name].source == local
    assert DEFAULT_MODELS[1].name in registry  # the other built-ins stay offered


def test_auth_pairs_and_the_warning_when_exposed_without_them(monkeypatch, caplog):
    assert app.parse_auth("") is None
    assert app.parse_auth("ann:se:cret, bob:pw") == [("ann", "se:cret"), ("bob", "pw")]
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        app.parse_auth("ann")
    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append(kwargs))
    with caplog.at_level("WARNING", logger="ernie_studio"):
        app.main(["--demo", "--host", "0.0.0.0"])
    assert launched[-1]["auth"] is None and "without authentication" in caplog.text
    caplog.clear()
    monkeypatch.setenv("ERNIE_STUDIO_AUTH", "ann:pw")
    with caplog.at_level("WARNING", logger="ernie_studio"):
        app.main(["--demo", "--host", "0.0.0.0"])
    assert launched[-1]["auth"] == [("ann", "pw")] and "without authentication" not in caplog.text


def test_a_server_with_auth_answers_only_after_login(demo_names):
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port)], cwd=ROOT,
                              env={**os.environ, "ERNIE_STUDIO_AUTH": "ann:pw"}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "app.py did not start"
                time.sleep(0.3)
        with pytest.raises(Exception):
            Client(url, verbose=False).predict("hi", demo_names[0], api_name="/chat")
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
        reply = Client(url, auth=("ann", "pw"), verbose=False).predict("hi", demo_names[0], "", 4, 0.0, api_name="/chat")
        assert any("tokens" in (m.get("metadata") or {}).get("title", "") for m in reply)
    finally:
        server.terminate()
        server.wait(10)


def test_upload_limit_flag_and_variable(monkeypatch):
    assert app.max_upload_bytes(app.parse_args([])) == 200 * 2**20
    monkeypatch.setenv("ERNIE_STUDIO_MAX_UPLOAD_MB", "1.5")
    assert app.max_upload_bytes(app.parse_args([])) == int(1.5 * 2**20)
    assert app.max_upload_bytes(app.parse_args(["--max-upload-mb", "2"])) == 2 * 2**20
