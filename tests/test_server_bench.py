"""The short version of benchmarks/bench_serve.py that CI runs: concurrent streaming clients
against `molecule-gpt serve`, with training off and on, and not one error. (The recorded
figures come from the full run: 16 clients x 60 s, see benchmarks/RESULTS.md.)"""
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def test_short_load_has_no_errors(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--clients", "6", "--duration", "4", "--rounds", "1",
                           "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "errors in all: 0; server exits: [0]" in proc.stdout, proc.stdout
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"training off", "training on"}
    for r in rows:
        assert r["requests"] >= 6 and r["errors"] == 0 and r["tokens_per_s"] > 0
    on = next(r for r in rows if r["mode"] == "training on")
    off = next(r for r in rows if r["mode"] == "training off")
    assert on["train_steps"] > 0 and off["train_steps"] == 0  # it trained while serving, and only then
    assert re.search(r"TTFT p99 training on / off, per round: [\d.]+", proc.stdout)
