"""Smoke test of the benchmark scripts: a --quick CPU run writes well-formed CSV rows and a plot.

The figures of a --quick run mean nothing; this only keeps the scripts from rotting."""
import csv
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


def test_bench_softmax_quick_run_writes_csv_and_plot(tmp_path):
    out = tmp_path / "results.csv"
    cmd = [sys.executable, str(BENCH / "bench_softmax.py"), "--device", "cpu", "--quick", "--out", str(out),
           "--providers", "fusedtx_native,torch,torch_unfused"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Headline targets" in run.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0].keys()) == common.CSV_COLUMNS
    providers = {r["provider"] for r in rows if r["kernel"].startswith("softmax")}
    assert providers == {"fusedtx_native", "torch", "torch_unfused"}
    assert {r["mode"] for r in rows if r["kernel"] == "softmax"} == {"forward", "backward", "full"}
    assert {r["kernel"] for r in rows} >= {"ceiling", "softmax", "softmax_causal"}
    for r in rows:
        assert float(r["p50"]) > 0 and r["device"] and r["fusedtx_version"] and r["timestamp"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        f"{k}_{common._slug(rows[0]['device'])}.png" for k in ("softmax", "softmax_causal"))
