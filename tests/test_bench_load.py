"""The load benchmark runs at a small size against the demo app, so that it cannot rot between
measurements: every request of every endpoint is served and the report comes out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENDPOINTS = ["chat", "image", "video", "classify"]


def test_load_benchmark_serves_every_request(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, "bench/bench_load.py", "--users", "2", "--seconds", "8",
                             "--mix", ",".join(ENDPOINTS), "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["overall"]["failed"] == 0, report["errors"]
    assert all(report["endpoints"][e]["served"] >= 1 for e in ENDPOINTS)
    assert len(report["rss_mib"]) >= 3 and all(mib > 0 for _, mib in report["rss_mib"])
    table = [line for line in result.stdout.splitlines() if line.startswith("| /") or line.startswith("| all")]
    assert [line.split("|")[1].strip() for line in table] == [*(f"/{e}" for e in ENDPOINTS), "all"]
