"""`transformers` and `sentencepiece` are test-only references: the runtime must work without them."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter where importing transformers or sentencepiece fails, as on a machine without them.
SCRIPT = """
import importlib.abc, sys, tempfile

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "sentencepiece"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
import importlib.util
import models
for runtime_module in ("app", "ernie_app"):  # the web app, once present
    if importlib.util.find_spec(runtime_module):
        importlib.import_module(runtime_module)
from models.factory import tiny_config, write_checkpoint, write_ernie_m_checkpoint

folder = write_checkpoint(tempfile.mkdtemp(), tiny_config("moe"))
model = models.load_model(folder, device="cpu")
tokenizer = models.load_tokenizer(folder)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
tokens = list(models.generate(model, tokenizer.encode(prompt), 4, eos_token_ids=[]))
assert len(tokens) == 4
folder = write_ernie_m_checkpoint(tempfile.mkdtemp())
result = models.zero_shot_classify(models.load_model(folder, device="cpu"), models.load_tokenizer(folder), "我喜欢足球", ["体育", "政治"])
assert len(result.scores) == 2
assert not any(m.split(".")[0] in ("transformers", "sentencepiece") for m in sys.modules)
print("ok")
"""


def test_runtime_works_without_transformers():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_runtime_module_imports_transformers():
    """Static check of every runtime source file (tests/ and the peer benchmarks in bench/ aside)."""
    sources = [*ROOT.glob("*.py"), *(ROOT / "models").rglob("*.py"), *(ROOT / "ernie_app").rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if imported_modules(p) & {"transformers", "sentencepiece"}]
    assert len(sources) > 5
    assert offenders == []
