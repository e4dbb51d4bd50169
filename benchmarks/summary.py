"""What the bench scripts print after a run: p50 tables with ratios to the peers, and the
headline targets (printed, never asserted)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import MODES, device_name  # noqa: E402


def print_summary_header(ceilings: dict, args) -> None:
    copy_bw = ceilings.get("copy_bandwidth")
    print()
    print(f"Summary: p50 GB/s on {device_name(args.device)}"
          + (f"; copy bandwidth (copy_) {copy_bw:.1f} GB/s" if copy_bw else "; copy bandwidth unknown"))


def print_ratio_table(rows: list[dict], kernel: str, eager: str, compiled: str, metric: str = "bandwidth") -> dict:
    """Print p50 `metric` (GB/s by default) per (dtype, shape, mode) for fusedtx native/triton and
    the two peers, with native's ratios; return {(kernel, dtype, shape, mode, provider): p50}."""
    bw = {(r["kernel"], r["dtype"], r["shape"], r["mode"], r["provider"]): float(r["p50"])
          for r in rows if r["metric"] == metric}
    keys = sorted({k[1:4] for k in bw if k[0] == kernel},
                  key=lambda k: (k[0], [int(s) for s in k[1].split("x")], MODES.index(k[2])))
    if keys:
        print(f"\n{kernel}: eager = {eager}, compile = {compiled}; nat = fusedtx_native, tri = fusedtx_triton")
        print(f"  {'dtype':9s} {'shape':>14s} {'mode':8s} {'nat':>8s} {'tri':>8s} {'eager':>8s} {'compile':>8s} "
              f"{'nat/eager':>9s} {'nat/comp':>9s} {'tri/eager':>9s}")
    for dtype, shape, mode in keys:
        get = lambda p: bw.get((kernel, dtype, shape, mode, p))  # noqa: E731
        nat, tri, eag, com = get("fusedtx_native"), get("fusedtx_triton"), get(eager), get(compiled)
        print(f"  {dtype:9s} {shape:>14s} {mode:8s} {fmt_num(nat):>8s} {fmt_num(tri):>8s} {fmt_num(eag):>8s} {fmt_num(com):>8s} "
              f"{fmt_ratio(nat, eag):>9s} {fmt_ratio(nat, com):>9s} {fmt_ratio(tri, eag):>9s}")
    return bw


def print_bandwidth_targets(bw: dict, kernel: str, fractions: dict, copy_bw: float | None,
                            width_range: tuple[int, int] | None = None) -> None:
    """GPU headlines: for each fusedtx provider, dtype and mode, the worst p50 GB/s of the sweep
    (last dim within width_range, if given) as a fraction of copy bandwidth vs its target."""
    widths = f" for N {width_range[0]}..{width_range[1]}" if width_range else ""
    for provider in ("fusedtx_native", "fusedtx_triton"):
        for dtype in sorted({k[1] for k in bw if k[0] == kernel}):
            for mode, fraction in fractions.items():
                pts = [(k[2], v) for k, v in bw.items() if k[:2] == (kernel, dtype) and k[3:] == (mode, provider)
                       and (width_range is None or width_range[0] <= int(k[2].split("x")[-1]) <= width_range[1])]
                worst = min(pts, key=lambda p: p[1]) if pts else (None, None)
                print_target(f"GPU {kernel} {dtype} {mode:8s}: {provider} >= {fraction:.0%} of copy bandwidth"
                             f"{widths} (worst {worst[0]})", worst[1], copy_bw, fraction, unit="%")


def print_target(label: str, ours: float | None, reference: float | None, target: float, unit: str = "x") -> None:
    """One headline line: 'label: 1.23x -> met' (printed, never asserted)."""
    if ours is None or not reference:
        verdict = "not measured"
    else:
        value = ours / reference
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        verdict = f"{shown} -> {'met' if value >= target else 'NOT met'}"
    print(f"  {label}: {verdict}")


def fmt_num(v):
    return "-" if v is None else f"{v:.3g}"


def fmt_ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"
