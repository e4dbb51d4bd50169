"""Draw the benchmark PNGs from the results CSV (the only source of README figures).

    python benchmarks/plot.py                              # benchmarks/results/results.csv -> benchmarks/results/
    python benchmarks/plot.py --csv /tmp/bench_test.csv --out-dir /tmp/plots --kernel softmax

One PNG per (kernel, device), named <kernel>_<device>.png, from the latest run of that kernel
on that device; see plot_results for the layout. The bench scripts draw theirs through
cli.finish after a run.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import DEFAULT_CSV, MODES, RESULTS_DIR, read_rows  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def latest_run(rows: Sequence[dict]) -> list[dict]:
    """Of rows of one (kernel, device), those of the most recent run (its timestamp)."""
    if not rows:
        return []
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def plot_results(csv_path: str | Path = DEFAULT_CSV, out_dir: str | Path = RESULTS_DIR,
                 kernels: Sequence[str] | None = None) -> list[Path]:
    """Draw one PNG per (kernel, device) from the CSV: metric vs x_value, one line per provider
    (p50, with a p20..p80 band), one subplot per (dtype, metric) row and mode column, and the
    device's copy-bandwidth / matmul ceilings as dashed lines. Only the latest run of each
    (kernel, device) is drawn. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ceilings = {}  # (device, metric unit) -> [(label, value)]
    for device in {r["device"] for r in rows}:
        for (metric, unit), group in _group(latest_run([r for r in rows if r["kernel"] == "ceiling" and r["device"] == device]),
                                            ("metric", "unit")).items():
            ceilings.setdefault((device, unit), []).extend(
                (f"{metric.replace('_', ' ')} ({r['provider']}, {r['dtype']})", r["p50"]) for r in group)

    written = []
    groups = _group([r for r in rows if r["kernel"] != "ceiling" and (not kernels or r["kernel"] in kernels)],
                    ("kernel", "device"))
    for (kernel, device), kernel_rows in sorted(groups.items()):
        run = latest_run(kernel_rows)
        modes = [m for m in MODES if any(r["mode"] == m for r in run)] or sorted({r["mode"] for r in run})
        panels = sorted({(r["dtype"], r["metric"], r["unit"], _layer(r)) for r in run},
                        key=lambda p: (p[1] not in ("bandwidth", "throughput"), p))
        fig, axes = plt.subplots(len(panels), len(modes), figsize=(max(5.0 * len(modes), 7.5), 3.6 * len(panels)),
                                 squeeze=False)
        providers = sorted({r["provider"] for r in run}, key=lambda p: (not p.startswith("fusedtx"), p))
        colors = {p: f"C{i}" for i, p in enumerate(providers)}
        for i, (dtype, metric, unit, layer) in enumerate(panels):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                cell = [r for r in run if (r["dtype"], r["metric"], r["mode"], _layer(r)) == (dtype, metric, mode, layer)]
                xs_all = sorted({r["x_value"] for r in cell})
                single = len(xs_all) == 1  # one size only: bars per provider instead of lines
                for k, provider in enumerate(providers):
                    pts = sorted((r["x_value"], r["p50"], r["p20"], r["p80"]) for r in cell if r["provider"] == provider)
                    if not pts:
                        continue
                    xs, p50, p20, p80 = zip(*pts)
                    lo, hi = [min(a, b) for a, b in zip(p20, p80)], [max(a, b) for a, b in zip(p20, p80)]
                    if single:
                        ax.bar([k], p50, color=colors[provider], label=provider,
                               yerr=[[m - a for m, a in zip(p50, lo)], [b - m for m, b in zip(p50, hi)]], capsize=3)
                    else:
                        ax.plot(xs, p50, marker="o", ms=3, color=colors[provider], label=provider)
                        ax.fill_between(xs, lo, hi, color=colors[provider], alpha=0.2, linewidth=0)
                for k, (label, value) in enumerate(ceilings.get((device, unit), [])):
                    ax.axhline(value, color="k", linestyle=("--", ":", "-.")[k % 3], linewidth=1, label=label)
                if single:
                    ax.set_xticks([])
                    ax.set_xlabel(f"{cell[0]['x_name']} = {xs_all[0]:g} ({cell[0]['shape']})")
                else:
                    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
                        ax.set_xscale("log", base=2)
                    ax.set_xlabel(cell[0]["x_name"] if cell else "")
                ax.set_title(f"{mode} · {dtype}" + (f" · {layer}" if layer else ""), fontsize=10)
                ax.set_ylabel(f"{metric} ({unit})")
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
        # One legend for the whole figure, below the panels, so no line is hidden behind it.
        legend = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        n_legend_rows = math.ceil(len(legend) / 4) if legend else 0
        fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(4, len(legend) or 1),
                   fontsize=8, frameon=False)
        r0 = run[0]
        fig.suptitle(f"{kernel} — {device}\nfusedtx {r0['fusedtx_version']}, torch {r0['torch_version']}, "
                     f"{r0['timestamp']} (p50, band p20–p80)", fontsize=11)
        fig.tight_layout(rect=(0, min(0.4, 0.05 * n_legend_rows / len(panels) + 0.02), 1, 1))
        path = out_dir / f"{kernel}_{slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# Sweeps whose x-axis is one dim of a longer shape get one row of panels per value of the other
# dims: x name -> the swept dim (Linear's M of M x K x N, attention's T or L of B x H x T x D).
SWEPT_DIM = {"M": 0, "T": 2, "L": 2}


def _layer(row: dict) -> str:
    dims = row["shape"].split("x")
    at = SWEPT_DIM.get(row["x_name"])
    if at is None or at >= len(dims) or len(dims) < 3:
        return ""
    return "x".join(dims[:at] + ["·"] + dims[at + 1:])


def _group(rows: Iterable[dict], keys: Sequence[str]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="results CSV to read")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where to write the PNGs")
    parser.add_argument("--kernel", action="append", default=None,
                        help="only this kernel (repeatable), default every kernel in the CSV")
    args = parser.parse_args(argv)
    if not Path(args.csv).exists():
        parser.error(f"--csv {args.csv}: no such file (run a benchmark first)")
    paths = plot_results(args.csv, args.out_dir, kernels=args.kernel)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("nothing to plot" + (f" for kernel(s) {args.kernel}" if args.kernel else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
