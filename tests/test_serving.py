"""fusedtx.serving: the continuous-batching server gives each request the completion it gets
alone, whatever the schedule, on a batch-invariant model; on a batch-dependent one (the negative
control) the schedule shows in the logits."""
from __future__ import annotations

import pytest
import torch

from fusedtx.models import GPT, GPTConfig
from fusedtx.serving import Request, serve

CONFIG = GPTConfig.preset("tiny")
# (prompt length, tokens wanted) of each request
SPECS = [(5, 6), (1, 3), (9, 7), (3, 2), (12, 5)]


class BatchDependentGPT(GPT):
    """Hidden states that depend on the batch's size: what a kernel that picks its reduction
    order from the batch does, exaggerated so that it shows at every size."""

    def hidden_states(self, idx, kv_cache=None):
        return super().hidden_states(idx, kv_cache) * (1 + 1e-3 * idx.shape[0])


def model_of(cls=GPT):
    torch.manual_seed(0)
    state = GPT(CONFIG).state_dict()
    model = cls(CONFIG, backend="native").eval()
    model.load_state_dict(state)
    return model


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g) for n, _ in SPECS]


def serve_with(model, arrivals, slots, garbage_seed):
    """{request id: (tokens, stacked logits)} of one serve of SPECS under this schedule."""
    requests = [Request(i, p, m, arrival=a) for i, (p, (_, m), a) in enumerate(zip(prompts(), SPECS, arrivals))]
    serve(model, requests, slots, garbage=torch.Generator().manual_seed(garbage_seed))
    assert all(len(r.tokens) == r.max_new_tokens == len(r.logits) for r in requests)
    return {r.id: (r.tokens, torch.stack(r.logits)) for r in requests}


# all together in one prefill, and staggered arrivals through fewer slots with other padding
SCHEDULES = (dict(arrivals=[0, 0, 0, 0, 0], slots=5, garbage_seed=0),
             dict(arrivals=[4, 0, 2, 2, 1], slots=2, garbage_seed=1))


@pytest.fixture(scope="module")
def native():
    from fusedtx import backends

    if not backends.is_available("native", "cpu"):
        pytest.skip("the native backend cannot run here")


def test_two_schedules_give_the_same_completion(native):
    model = model_of()
    first, second = (serve_with(model, **s) for s in SCHEDULES)
    for i in first:
        assert first[i][0] == second[i][0], i
        assert torch.equal(first[i][1], second[i][1]), i


def test_negative_control_batch_dependent_model_differs(native):
    """The same comparison can fail: a model whose arithmetic depends on the batch gives some
    request other logits under the other schedule."""
    model = model_of(BatchDependentGPT)
    first, second = (serve_with(model, **s) for s in SCHEDULES)
    assert any(not torch.equal(first[i][1], second[i][1]) for i in first)


def test_server_completes_requests_as_generate_alone(native):
    """With any schedule, each request's completion is generate()'s for its prompt alone (on
    fusedtx, bit for bit)."""
    model = model_of()
    served = serve_with(model, **SCHEDULES[1])
    for i, prompt in enumerate(prompts()):
        alone = model.generate([prompt], SPECS[i][1], return_logits=True)
        assert served[i][0] == alone.tokens[0].tolist()
        assert torch.equal(served[i][1], alone.logits[0])
