"""Smoke test of the benchmark scripts: a --quick CPU run writes well-formed CSV rows and plots.

The figures of a --quick run mean nothing; this only keeps the scripts from rotting."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
from plot import slug  # noqa: E402
from results_csv import CSV_COLUMNS, read_rows  # noqa: E402

# script -> (providers to run, kernels it writes)
SCRIPTS = {
    "bench_softmax.py": ("fusedtx_native,torch,torch_unfused", {"softmax", "softmax_causal"}),
    "bench_log_softmax.py": ("fusedtx_native,torch", {"log_softmax"}),
    "bench_layer_norm.py": ("fusedtx_native,torch", {"layer_norm"}),
    "bench_rms_norm.py": ("fusedtx_native,torch", {"rms_norm"}),
    "bench_linear.py": ("fusedtx_native,torch", {"linear", "linear_gelu"}),
    "bench_swiglu.py": ("fusedtx_native,torch", {"swiglu_ffn"}),
    "bench_causal_attention.py": ("fusedtx_native,fusedtx_native_unsplit,torch", {"attention_prefill", "attention_decode"}),
    "bench_rope.py": ("fusedtx_native,hf_eager", {"rope"}),
}


def test_committed_results_parse():
    """The README's figures and the plots read the committed CSV: every row must parse."""
    rows = read_rows(BENCH / "results" / "results.csv")
    assert rows and all(tuple(r.keys()) == CSV_COLUMNS for r in rows)
    assert not duplicate_rows(rows), f"rows recorded twice (a merge that concatenated the CSV?): {duplicate_rows(rows)[:3]}"


def duplicate_rows(rows: list[dict]) -> list[dict]:
    """Rows that occur more than once: each carries its run's timestamp, so a repeat is a copy."""
    seen, repeated = set(), []
    for r in rows:
        key = tuple(r.values())
        if key in seen:
            repeated.append(r)
        seen.add(key)
    return repeated


def test_duplicate_rows_are_found():
    """Negative control for the check above."""
    row = dict.fromkeys(CSV_COLUMNS, "1")
    assert duplicate_rows([row, dict(row, p50="2")]) == [] and duplicate_rows([row, dict(row)]) == [row]


def test_read_rows_names_a_bad_line(tmp_path):
    """Negative control: a second header (what a careless merge leaves) is reported with its line."""
    good = ",".join(["ceiling", "copy_", "forward", "copy_bandwidth", "GB/s", "bytes", "1", "2", "1", "3", "float32",
                     "8", "cpu", "0", "2", "t", "avx2"])
    bad = tmp_path / "results.csv"
    bad.write_text("\n".join([",".join(CSV_COLUMNS), good, ",".join(CSV_COLUMNS), good]) + "\n")
    with pytest.raises(ValueError, match="line 3: x_value is 'x_value'"):
        read_rows(bad)


def test_isa_summary_compares_each_vector_path_with_its_own_eager_run():
    """benchmarks/isa_summary.py: the newest run per (device, isa), native over the eager peer of
    the same run; rows without an isa (older than the column) are left out."""
    from isa_summary import ratios

    def row(isa, provider, p50, stamp, shape="4x8", mode="forward"):
        return dict(kernel="softmax", provider=provider, mode=mode, metric="bandwidth", dtype="float32", shape=shape,
                    device="cpu0", isa=isa, timestamp=stamp, p50=p50)

    rows = [row("avx2", "fusedtx_native", 10.0, "t1"), row("avx2", "torch", 20.0, "t1"),      # older run
            row("avx2", "fusedtx_native", 9.0, "t2"), row("avx2", "torch", 10.0, "t2"),
            row("avx2", "fusedtx_native", 30.0, "t2", shape="8x8"), row("avx2", "torch", 20.0, "t2", shape="8x8"),
            row("scalar", "fusedtx_native", 5.0, "t3"), row("scalar", "torch", 10.0, "t3"),
            row("", "fusedtx_native", 1.0, "t0"), row("", "torch", 10.0, "t0")]
    table = ratios(rows, None)
    assert sorted(table[("cpu0", "avx2", "softmax", "float32", "forward")]) == [(0.9, "4x8"), (1.5, "8x8")]
    assert table[("cpu0", "scalar", "softmax", "float32", "forward")] == [(0.5, "4x8")]
    assert set(table) == {("cpu0", "avx2", "softmax", "float32", "forward"), ("cpu0", "scalar", "softmax", "float32", "forward")}


def quick_run(script, providers, kernels, tmp_path, *flags) -> tuple[list[dict], str]:
    """Run script --quick on CPU into tmp_path; check the CSV's form and the plots; return (rows, stdout)."""
    out = tmp_path / "results.csv"
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", "--quick", "--out", str(out), "--providers", providers,
           *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Headline targets" in run.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0].keys()) == CSV_COLUMNS
    assert {r["kernel"] for r in rows} == kernels | {"ceiling"}
    assert {r["provider"] for r in rows if r["kernel"] != "ceiling"} == set(providers.split(",")), run.stderr[-3000:]
    from fusedtx import _extension

    for r in rows:
        assert float(r["p50"]) > 0 and r["device"] and r["fusedtx_version"] and r["timestamp"]
        assert r["isa"] == _extension.status().cpu_isa, r  # the native kernels' vector path
    device = slug(rows[0]["device"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{k}_{device}.png" for k in kernels)
    return rows, run.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_run_writes_csv_and_plots(script, tmp_path):
    providers, kernels = SCRIPTS[script]
    rows, _ = quick_run(script, providers, kernels, tmp_path)
    assert {r["mode"] for r in rows if r["kernel"] != "ceiling"} == {"forward", "backward", "full"}


@pytest.mark.parametrize("script, prefix, providers", [
    ("bench_gpt.py", "gpt2", "fusedtx_native,hf_eager,hf_sdpa,hf_converted"),
    ("bench_llama.py", "smollm2_135m", "fusedtx_native,hf_sdpa,hf_converted"),
])
def test_quick_model_run(script, prefix, providers, tmp_path):
    """bench_gpt.py / bench_llama.py on a tiny model: every workload and provider measured (each
    passed its correctness guard against float64 and its code-path check, or it would have no
    row), tokens/s in the CSV, and the weights' bandwidth for generation."""
    pytest.importorskip("transformers")
    kernels = {f"{prefix}_prefill", f"{prefix}_generate", f"{prefix}_train"}
    rows, stdout = quick_run(script, providers, kernels, tmp_path, "--no-compile")
    model_rows = [r for r in rows if r["kernel"] != "ceiling"]
    assert {(r["kernel"], r["mode"]) for r in model_rows} == {
        (f"{prefix}_prefill", "forward"), (f"{prefix}_generate", "forward"), (f"{prefix}_train", "full")}
    assert {(r["kernel"].removeprefix(prefix), r["metric"], r["unit"]) for r in model_rows} == {
        ("_prefill", "throughput", "tokens/s"), ("_train", "throughput", "tokens/s"),
        ("_generate", "throughput", "tokens/s"), ("_generate", "weight_bandwidth", "GB/s")}
    count = len(providers.split(","))
    for kernel in kernels:  # every provider at every shape of every workload
        shapes = {r["shape"] for r in model_rows if r["kernel"] == kernel and r["metric"] == "throughput"}
        assert shapes and all(len([r for r in model_rows if (r["kernel"], r["shape"], r["metric"]) ==
                                   (kernel, s, "throughput")]) == count for s in shapes), kernel
    assert "hf_sdpa" in stdout and f"{prefix}_generate" in stdout


def test_batch_chosen_split_depends_on_the_batch(monkeypatch):
    """The `_batchsplit` providers of bench_causal_attention.py (the cost of invariance on a GPU)
    model a split-KV heuristic: on 132 multiprocessors a lone sequence gets small chunks and a
    full batch large ones — the batch dependence fusedtx refuses — always a power of two >= 16
    that fusedtx accepts, never more chunks than 16-key pieces."""
    import torch

    import bench_causal_attention
    from fusedtx import config

    monkeypatch.setattr(bench_causal_attention, "parallel_workers", lambda device: 132)
    cpu = torch.device("cpu")
    splits = {b: bench_causal_attention.batch_chosen_split(b, 12, 4096, cpu) for b in (1, 4, 16, 64)}
    assert splits == {1: 256, 4: 1024, 16: 2048, 64: 4096}
    assert bench_causal_attention.batch_chosen_split(1, 1, 20, cpu) == 16
    for s in splits.values():
        assert config._check_split_size(s, "test") == s


def test_quick_serving_run(tmp_path):
    """bench_serving.py on tiny models: every provider's throughput, and the engines' latencies."""
    out = tmp_path / "serving.csv"
    cmd = [sys.executable, str(BENCH / "bench_serving.py"), "--device", "cpu", "--quick", "--out", str(out), "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    for kernel in ("gpt2_serving", "smollm2_135m_serving"):
        got = {(r["provider"], r["metric"]) for r in rows if r["kernel"] == kernel}
        assert {(p, "throughput") for p in ("engine_fusedtx", "engine_plain", "hf_static")} <= got, got
        assert {("engine_fusedtx", "time_to_first_token"), ("engine_fusedtx", "inter_token")} <= got, got
    assert all(r["p50"] > 0 for r in rows)


def test_quick_overhead_run(tmp_path):
    """bench_overhead.py: host microseconds per call for every op, provider and mode (each
    output checked against float64 torch first), time-like percentiles (p20 <= p50 <= p80)."""
    out = tmp_path / "results.csv"
    cmd = [sys.executable, str(BENCH / "bench_overhead.py"), "--device", "cpu", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    ops = {"softmax", "layer_norm", "linear", "causal_attention"}
    providers = {"fusedtx_native", "fusedtx_native_registered", "torch"}
    assert {(r["kernel"], r["provider"], r["mode"]) for r in rows} == {
        (f"overhead_{op}", p, m) for op in ops for p in providers for m in ("forward", "backward")}
    for r in rows:
        assert (r["metric"], r["unit"]) == ("latency", "us")
        assert 0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    device = slug(rows[0]["device"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"overhead_{op}_{device}.png" for op in ops)
