"""The committed output-hash table (tests/output_hashes.py): every native and reference output
and gradient of the public API keeps its bits. A restructuring or a kernel change that alters
one bit of any op, dtype or model output fails here, naming the row."""
import json
from pathlib import Path

import pytest

import output_hashes
from helpers import require

TABLE = json.loads((Path(__file__).parent / "output_hashes.json").read_text())


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("op", sorted(output_hashes.OPS))
def test_outputs_keep_their_bits(op, backend):
    require("cpu", backend)
    rows = output_hashes.table([backend], [op])
    portable = {k: v for k, v in rows.items() if output_hashes.portable(k.split("|")[0], backend, k.split("|")[2])}
    assert portable, "no portable rows: the table generator lost its cases"
    changed = {k: (TABLE.get(k), v) for k, v in portable.items() if TABLE.get(k) != v}
    assert not changed, f"{len(changed)} of {len(portable)} rows changed bits (expected, got): {changed}"


def test_a_changed_bit_is_caught():
    """Negative control: one ulp on one element changes the row's hash."""
    import torch

    x = output_hashes.exact_values((3, 5), 0, torch.float32)
    y = x.clone()
    y.view(-1)[7] = torch.nextafter(y.view(-1)[7], torch.tensor(float("inf")))
    assert output_hashes.digest(x) != output_hashes.digest(y)
    assert output_hashes.digest(x) == output_hashes.digest(x.clone())
