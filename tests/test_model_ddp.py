"""GPT and Llama training under torch.distributed (gloo, 2 processes on CPU, DistributedDataParallel): both
ranks end with the same parameters bit for bit, and the same bits in a second run.

Each rank trains on its own data; DDP averages the gradients. The negative control trains the
same ranks without DDP, whose parameters then differ between ranks — the comparison can fail.
"""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedtx.models import GPT, GPTConfig, Llama, LlamaConfig

STEPS = 3
MODELS = {"gpt": lambda: GPT(GPTConfig.preset("tiny"), backend="native"),
          "llama": lambda: Llama(LlamaConfig.preset("tiny-qwen3"), backend="native")}


def _train_rank(rank: int, world: int, init_file: str, out_dir: str, use_ddp: bool, kind: str) -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same init on every rank (DDP also broadcasts rank 0's)
        model = MODELS[kind]().train()
        trained = torch.nn.parallel.DistributedDataParallel(model) if use_ddp else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
        losses = []
        for _ in range(STEPS):
            idx = torch.randint(0, model.vocab_size, (2, 25), generator=data)
            _, loss = trained(idx[:, :-1], idx[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks are past their last collective
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without tearing the process group down: ~ProcessGroupGloo joins its worker threads
    # while the main thread holds the GIL, and a worker that needs the GIL to finish a job waits
    # forever. A rank hung there in a CI run (gdb: main thread in ~ProcessGroupGloo ->
    # std::thread::join, a pt_gloo_runloop thread in take_gil), and the test with it.
    os._exit(0)


def run_ranks(tmp_path, name: str, use_ddp: bool, kind: str = "gpt"):
    out_dir = tmp_path / name
    out_dir.mkdir()
    mp.start_processes(_train_rank, args=(2, str(tmp_path / f"{name}.init"), str(out_dir), use_ddp, kind), nprocs=2,
                       join=True, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def same_params(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_ddp_ranks_end_identical_and_runs_repeat(tmp_path, kind):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    first, second = run_ranks(tmp_path, "first", True, kind), run_ranks(tmp_path, "second", True, kind)
    assert first[0]["losses"] != first[1]["losses"], "the ranks should see different data"
    assert same_params(first[0]["params"], first[1]["params"]), "DDP ranks ended with different parameters"
    assert same_params(first[0]["params"], second[0]["params"]), "two DDP runs ended with different parameters"
    assert first[0]["losses"] == second[0]["losses"] and first[1]["losses"] == second[1]["losses"]
    if kind != "gpt":
        return  # the negative control tests the comparison, not the model: once is enough
    # negative control: without DDP's gradient averaging the ranks drift apart, and the check sees it
    alone = run_ranks(tmp_path, "no_ddp", False)
    assert not same_params(alone[0]["params"], alone[1]["params"])
