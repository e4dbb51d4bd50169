"""fusedtx_native against torch eager per vector path (the CSV's `isa` column), from the CSV.

    FUSEDTX_MARCH=none python benchmarks/bench_softmax.py --providers fusedtx_native,torch  # a baseline run
    python benchmarks/isa_summary.py                      # every kernel, the newest run per (device, isa)
    python benchmarks/isa_summary.py --kernels softmax,linear --csv other.csv

For each (device, isa) the newest run of each kernel is taken (a run = one timestamp); within
it, every (dtype, shape, mode) measured by both fusedtx_native and the eager peer gives a ratio
of p50 rates (higher is better for fusedtx). Printed per kernel, dtype and mode: the geometric
mean, the worst ratio and its shape, the number of shapes.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import DEFAULT_CSV, read_rows  # noqa: E402

# The eager peer each kernel's native provider is compared with (as the bench scripts do).
EAGER = {"softmax_causal": "torch_unfused"}
RATE_METRICS = ("bandwidth", "throughput", "tflops")


def ratios(rows: list[dict], kernels: list[str] | None) -> dict:
    """{(device, isa, kernel, dtype, mode): [(ratio, shape), ...]} over the newest run per
    (device, isa, kernel)."""
    rows = [r for r in rows if r.get("isa") and r["metric"] in RATE_METRICS
            and (kernels is None or r["kernel"] in kernels)]
    newest = {}
    for r in rows:
        key = (r["device"], r["isa"], r["kernel"])
        if r["provider"] == "fusedtx_native":
            newest[key] = max(newest.get(key, ""), r["timestamp"])
    p50 = {(r["device"], r["isa"], r["kernel"], r["dtype"], r["shape"], r["mode"], r["provider"]): r["p50"]
           for r in rows if newest.get((r["device"], r["isa"], r["kernel"])) == r["timestamp"]}
    out = defaultdict(list)
    for (device, isa, kernel, dtype, shape, mode, provider), ours in p50.items():
        if provider != "fusedtx_native":
            continue
        peer = p50.get((device, isa, kernel, dtype, shape, mode, EAGER.get(kernel, "torch")))
        if peer:
            out[(device, isa, kernel, dtype, mode)].append((ours / peer, shape))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--kernels", default=None, help="comma-separated kernels (default: all with an isa)")
    args = parser.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    table = ratios(read_rows(args.csv), kernels)
    if not table:
        print(f"no fusedtx_native rows with an isa and an eager peer in {args.csv}")
        return 1
    print(f"{'device':28s} {'isa':7s} {'kernel':18s} {'dtype':9s} {'mode':8s} {'geomean':>8s} {'worst':>7s}  shapes")
    for (device, isa, kernel, dtype, mode), values in sorted(table.items()):
        geo = math.exp(sum(math.log(v) for v, _ in values) / len(values))
        worst, shape = min(values)
        print(f"{device[:28]:28s} {isa:7s} {kernel:18s} {dtype:9s} {mode:8s} {geo:7.2f}x {worst:6.2f}x  "
              f"{len(values)} (worst {shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
