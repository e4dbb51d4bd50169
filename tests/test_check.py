"""`python -m fusedtx check` and `python -m fusedtx demo`.

The check's property functions (fusedtx/check_properties.py) run in-process on a small
workload: fusedtx passes them on every CPU backend here; a model with batch-dependent noise
fails them (the negative control: the check can fail, and then the exit code says so); the JSON
has its schema. The command line (check --help, the demo with a few seconds of training) runs
end to end in a subprocess. The continuous-batching engine itself is tested in test_serving_engine.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fusedtx
from fusedtx import check, check_properties
from fusedtx.check_properties import Workload
from fusedtx.models import GPT, GPTConfig, Llama, PlainGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig.preset("tiny")
# every property's code path, on the smallest sizes that reach it
SMALL = Workload(max_len=12, compositions=2, max_others=3, prompts=2, new_tokens=4, prefill_len=10,
                       train_steps=1, train_batch=(2, 8), requests=4, serves=2, max_slots=3, serve_new_tokens=(2, 5))
# Not the Triton interpreter: the model properties under it are tests/test_model.py's and
# tests/test_properties.py's; the check's own machinery is the same code for every backend.
CPU_BACKENDS = [b for b in fusedtx.BACKENDS if b != "triton"]


def maker(cls=GPT, backend=None, seed=0):
    """A factory of identical models (what check.run_check hands each property)."""
    torch.manual_seed(seed)
    state = GPT(CONFIG).state_dict()

    def make():
        model = cls(CONFIG, backend=backend).eval()
        model.load_state_dict(state)
        return model
    return make


class BatchNoise:
    """Makes a model's hidden states depend on the shape of the batch — what a kernel that picks
    its reduction order from the batch does, exaggerated so that it shows at every size."""

    def hidden_states(self, idx, kv_cache=None):
        return super().hidden_states(idx, kv_cache) * (1 + 1e-3 * idx.numel())


class NoisyGPT(BatchNoise, GPT):
    pass


class NoisyPlainGPT(BatchNoise, PlainGPT):
    pass


def args(**overrides):
    defaults = dict(device="cpu", backends="native,plain", preset="tiny", seed=0, threads=None, quick=True,
                    json=None, no_progress=True, model="gpt")
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.fixture
def small_workloads(monkeypatch):
    """Every column of run_check / main gets the SMALL workload."""
    monkeypatch.setattr(check, "WORKLOADS", {name: SMALL for name in check.WORKLOADS})


# ---------------------------------------------------------------------------------------------
# fusedtx passes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_property_holds(backend):
    if not fusedtx.backends.is_available(backend, "cpu"):
        pytest.skip(f"{backend} cannot run here")
    report = check.run_check([check.Column(backend, lambda config: GPT(config, backend=backend), SMALL)],
                             check.Options(), progress=False)
    cells = report["results"][backend]["cells"]
    assert report["passed"], report["failed"]
    assert {key: cell["status"] for key, cell in cells.items()} == {key: "pass" for key, _ in check.PROPERTIES}
    assert all(cell["max_abs_diff"] in (0.0, None) for cell in cells.values())
    assert cells["serving"]["extra"]["unique_completions"] == [1] * SMALL.requests
    assert cells["serving_sampled"]["extra"]["unique_completions"] == [1] * SMALL.requests
    assert cells["on_policy"]["extra"]["kl"] == 0.0


def test_training_restores_thread_count():
    before = torch.get_num_threads()
    cells = check_properties.check_training(maker(backend="native"), SMALL, 0, torch.device("cpu"))
    assert torch.get_num_threads() == before
    assert cells["training_repeat"].status == cells["training_threads"].status == "pass"


# ---------------------------------------------------------------------------------------------
# ... and the check can fail
# ---------------------------------------------------------------------------------------------
def test_negative_control_batch_dependent_model_fails():
    make = maker(NoisyGPT, backend="native")
    for prop in (check_properties.check_batch_invariance, check_properties.check_generate_vs_forward,
                 check_properties.check_chunked_prefill, check_properties.check_on_policy):
        cell = prop(make, SMALL, 0)
        assert cell.status == "fail" and cell.max_abs_diff > 0, prop.__name__
    assert check_properties.check_serving(make, SMALL, 0).status == "fail"
    assert check_properties.check_serving_sampled(make, SMALL, 0).status == "fail"


def test_exit_code_is_nonzero_when_a_fusedtx_property_fails(monkeypatch, small_workloads, tmp_path, capsys):
    monkeypatch.setattr(check, "GPT", NoisyGPT)  # what every fusedtx column builds
    path = tmp_path / "report.json"
    assert check.main(args(json=str(path))) == 1
    report = json.loads(path.read_text())
    assert not report["passed"] and "native: batch_invariance" in report["failed"]
    assert "FAILED" in capsys.readouterr().out


def test_plain_pytorch_failing_is_not_an_error():
    """Only fusedtx columns decide the outcome: a failing plain-PyTorch column is the comparison."""
    columns = [check.Column("native", lambda config: GPT(config, backend="native"), SMALL),
               check.Column("plain PyTorch", NoisyPlainGPT, SMALL, is_fusedtx=False)]
    report = check.run_check(columns, check.Options(), progress=False)
    assert report["results"]["plain PyTorch"]["cells"]["batch_invariance"]["status"] == "fail"
    assert report["passed"] and report["failed"] == []


def test_a_crashing_property_is_a_failure(monkeypatch, small_workloads):
    def crash(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(check_properties, "check_chunked_prefill", crash)
    report = check.run_check(check.columns_for(["native"], True, torch.device("cpu")), check.Options(), progress=False)
    cell = report["results"]["native"]["cells"]["chunked_prefill"]
    assert cell["status"] == "error" and "boom" in cell["detail"] and not report["passed"]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def test_json_schema(small_workloads, tmp_path, capsys):
    path = tmp_path / "report.json"
    assert check.main(args(json=str(path))) == 0
    report = json.loads(path.read_text())
    assert {"passed", "failed", "versions", "device", "seed", "options", "model", "columns", "property_labels",
            "results", "seconds", "left_out"} <= set(report)
    assert report["versions"]["fusedtx"] == fusedtx.__version__ and report["versions"]["torch"] == torch.__version__
    assert report["device"]["type"] == "cpu" and report["seed"] == 0 and report["model"]["preset"] == "tiny"
    assert [c["name"] for c in report["columns"]] == ["native", "plain PyTorch"]
    assert [c["fusedtx"] for c in report["columns"]] == [True, False]
    assert list(report["property_labels"]) == [key for key, _ in check.PROPERTIES]
    for column in report["columns"]:
        result = report["results"][column["name"]]
        assert set(result) == {"cells", "seconds", "workload"} and result["workload"]["requests"] == SMALL.requests
        assert list(result["cells"]) == list(report["property_labels"])
        for cell in result["cells"].values():
            assert set(cell) == {"status", "max_abs_diff", "detail", "seconds", "extra"}
            assert cell["status"] in ("pass", "fail", "skipped", "error")
            assert cell["max_abs_diff"] is None or (isinstance(cell["max_abs_diff"], float) and math.isfinite(cell["max_abs_diff"]))
    table = capsys.readouterr().out
    assert "6 continuous batching" in table and "plain PyTorch" in table


def test_both_families_by_default(small_workloads, tmp_path, capsys):
    """--model all (the default) runs GPT, then Llama: one table each, one JSON with both."""
    path = tmp_path / "report.json"
    assert check.main(args(json=str(path), model="all")) == 0
    report = json.loads(path.read_text())
    assert report["passed"] and report["failed"] == [] and list(report["reports"]) == ["gpt", "llama"]
    llama = report["reports"]["llama"]
    assert llama["model"]["family"] == "llama" and llama["passed"]
    assert all(cell["status"] == "pass" for cell in llama["results"]["native"]["cells"].values())
    out = capsys.readouterr().out
    assert "check: GPT 'tiny'" in out and "check: Llama 'tiny' (llama" in out


def test_llama_failing_property_fails_the_check(monkeypatch, small_workloads, capsys):
    class NoisyLlama(BatchNoise, Llama):
        pass
    monkeypatch.setattr(check, "Llama", NoisyLlama)
    assert check.main(args(model="llama", backends="native")) == 1
    assert "FAILED" in capsys.readouterr().out


def test_progress_falls_back_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    bar = check._progress(2)
    bar.set_description_str("native: serving")
    bar.update(1)
    bar.close()
    assert "[1/2] native: serving" in capsys.readouterr().err


def test_unknown_or_unavailable_backend_is_a_usage_error(monkeypatch, capsys):
    assert check.main(args(backends="native,cudnn")) == 2
    monkeypatch.setattr(check, "_why_unavailable", lambda name, device: "not here")
    assert check.main(args(backends="native")) == 2
    assert "not here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command line, end to end
# ---------------------------------------------------------------------------------------------
def run_cli(*argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fusedtx", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_check_help():
    out = run_cli("check", "--help")
    assert out.returncode == 0, out.stderr
    assert "--backends" in out.stdout and "--json" in out.stdout and "--quick" in out.stdout


def test_demo_end_to_end(tmp_path):
    path = tmp_path / "demo.pt"
    out = run_cli("demo", "--seconds", "2", "--tokens", "12", "--out", str(path), "--no-progress", "--threads", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(f"{check._marks()[0]} the same") >= 2 and "batch size 16" in out.stdout
    assert out.stdout.count("log-probabilities identical") >= 2
    assert "largest log-probability change with the batch: fusedtx 0.0e+00" in out.stdout
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) >= {"state_dict", "config", "vocab"}
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    assert model.config.vocab_size == len(checkpoint["vocab"])
