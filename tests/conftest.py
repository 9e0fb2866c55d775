"""Shared test setup: no network, a private cache, the demo checkpoints and the ErnieM reference
results built once."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("ERNIE_STUDIO_CACHE", tempfile.mkdtemp(prefix="ernie-studio-test-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Eager decoding unless a test asks for the compiled step (tests/test_compiled.py): a background
# compile per loaded model would take the CI machine's cores for minutes.
os.environ["ERNIE_STUDIO_COMPILE"] = "0"


@pytest.fixture(scope="session")
def demo_registry():
    from ernie_app.demo import demo_models
    from ernie_app.registry import build_registry

    return build_registry(demo_models(), include_defaults=False)


@pytest.fixture(scope="session")
def demo_names(demo_registry):
    """dense, MoE and thinking demo model names, in that order."""
    return list(demo_registry)


@pytest.fixture(scope="session")
def ernie_m_reference(tmp_path_factory):
    """transformers 4.56.2's ErnieM results (checkpoints, outputs, token ids, zero-shot scores),
    computed once per session in its own venv (see ernie_m_reference.py)."""
    from ernie_m_reference import reference_spec, run_reference

    work = tmp_path_factory.mktemp("ernie_m_reference")
    spec = reference_spec(work)
    return spec, run_reference(spec, work / "out"), work / "out"
