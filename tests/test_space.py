"""README's front matter is the Hugging Face Space configuration: it must agree with the code."""
from __future__ import annotations

import re
from pathlib import Path

import gradio
import pytest
import yaml

from ernie_app.registry import DEFAULT_MODELS

ROOT = Path(__file__).resolve().parent.parent
# The flavours the Spaces configuration reference accepts (huggingface/hub-docs,
# docs/hub/spaces-config-reference.md, August 2026).
HARDWARE = {
    "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
    "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8",
}
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def config(readme) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert match, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(match.group(1))


def test_front_matter_opens_the_readme_and_the_prose_follows(readme, config):
    assert readme.split("\n---\n", 1)[1].lstrip().startswith("# ERNIE 4.5 Studio")
    assert config["title"] and config["license"] and config["tags"]
    assert {config["colorFrom"], config["colorTo"]} <= COLORS


def test_gradio_sdk_at_the_pinned_and_installed_version(config):
    pins = re.findall(r"^gradio==([^\s#]+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert config["sdk"] == "gradio"
    assert pins == [config["sdk_version"]] == [gradio.__version__]


def test_app_file_and_python_version(config, readme):
    assert (ROOT / config["app_file"]).is_file()
    version = config["python_version"]
    assert isinstance(version, str), "quote python_version: YAML reads 3.10 as the number 3.1"
    minimum = tuple(map(int, re.search(r"\(Python (\d+)\.(\d+)\+\)", readme).groups()))
    assert re.fullmatch(r"3\.\d+(\.\d+)?", version) and tuple(map(int, version.split(".")[:2])) >= minimum


def test_models_are_the_registry_defaults_and_preloads_among_them(config):
    assert config["models"] == [spec.source for spec in DEFAULT_MODELS]
    preloaded = [entry.split()[0] for entry in config["preload_from_hub"]]  # "repo [files [revision]]"
    assert preloaded == [DEFAULT_MODELS[0].source]
    assert set(preloaded) <= set(config["models"])


def test_short_description_and_hardware_are_valid_for_spaces(config):
    assert 0 < len(config["short_description"]) <= 60
    assert config["suggested_hardware"] in HARDWARE
