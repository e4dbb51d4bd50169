"""Smoke test of the benchmark scripts: a --quick CPU run writes well-formed CSV rows and plots.

The figures of a --quick run mean nothing; this only keeps the scripts from rotting."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

# script -> (providers to run, kernels it writes)
SCRIPTS = {
    "bench_softmax.py": ("fusedtx_native,torch,torch_unfused", {"softmax", "softmax_causal"}),
    "bench_layer_norm.py": ("fusedtx_native,torch", {"layer_norm"}),
    "bench_linear.py": ("fusedtx_native,torch", {"linear", "linear_gelu"}),
    "bench_attention.py": ("fusedtx_native,fusedtx_native_unsplit,torch", {"attention_prefill", "attention_decode"}),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_run_writes_csv_and_plots(script, tmp_path):
    providers, kernels = SCRIPTS[script]
    out = tmp_path / "results.csv"
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", "--quick", "--out", str(out), "--providers", providers]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Headline targets" in run.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0].keys()) == common.CSV_COLUMNS
    assert {r["kernel"] for r in rows} == kernels | {"ceiling"}
    assert {r["provider"] for r in rows if r["kernel"] != "ceiling"} == set(providers.split(","))
    assert {r["mode"] for r in rows if r["kernel"] != "ceiling"} == {"forward", "backward", "full"}
    for r in rows:
        assert float(r["p50"]) > 0 and r["device"] and r["fusedtx_version"] and r["timestamp"]
    device = common._slug(rows[0]["device"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{k}_{device}.png" for k in kernels)
