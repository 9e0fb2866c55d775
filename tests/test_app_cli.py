"""Command line, environment variables and the automatic demo mode of app.py."""
from __future__ import annotations

import app
from ernie_app.registry import DEFAULT_MODELS


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
