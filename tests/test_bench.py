"""The benchmark scripts run (tiny sizes), so that they cannot rot between measurements."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_classification_benchmark_runs_at_tiny_size():
    result = subprocess.run([sys.executable, "bench/bench_classify.py", "--tiny", "--repeats", "1", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ours") or line.startswith("| transformers")]
    assert len(rows) >= 2 and all(len(row.split("|")) == 5 for row in rows)


def test_text_benchmark_runs_at_tiny_size(tmp_path):
    result = subprocess.run([sys.executable, "bench/bench_text.py", "--model", "tiny", "--dir", str(tmp_path / "tiny")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    engines = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ours") or line.startswith("| transformers")]
    ours = ["ours", "ours-int8", "ours-eager", "ours-int8-eager"]
    assert engines == [*ours, "transformers", *ours, *ours]  # speed, concurrency and follow-up tables


def test_drift_benchmark_runs_at_tiny_size(tmp_path):
    result = subprocess.run([sys.executable, "bench/bench_drift.py", "--model", "tiny", "--dir", str(tmp_path / "tiny"),
                             "--prompts", "3", "--new-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| int8") or line.startswith("| bf16")]
    assert len(rows) == 4
