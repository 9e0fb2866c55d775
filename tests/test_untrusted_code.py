"""Nothing a checkpoint or a client sends is run as code: no trust_remote_code, no unpickling
beyond torch's weights-only loader, no eval/exec (the chat templates run in jinja's sandbox)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = [ROOT / "app.py", *sorted((ROOT / "ernie_app").glob("*.py")), *sorted((ROOT / "models").glob("*.py"))]


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_runtime_code_never_unpickles_or_evaluates_untrusted_data():
    for path in RUNTIME:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names), path
            if isinstance(node, ast.keyword):
                assert node.arg != "trust_remote_code", path
        for node, name in calls(tree):
            assert name not in ("eval", "exec", "compile", "pickle.load", "pickle.loads"), f"{path}: {name}"
            if name == "torch.load":
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                assert weights_only == "True", f"{path}:{node.lineno}: torch.load without weights_only=True"
