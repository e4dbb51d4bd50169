"""Draw the benchmark PNGs from the results CSV (the only source of README figures).

    python benchmarks/plot.py                              # benchmarks/results/results.csv -> benchmarks/results/
    python benchmarks/plot.py --csv /tmp/bench_test.csv --out-dir /tmp/plots --kernel softmax

One PNG per (kernel, device), named <kernel>_<device>.png, from the latest run of that kernel
on that device; see common.plot_results for the layout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV), help="results CSV to read")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where to write the PNGs")
    parser.add_argument("--kernel", action="append", default=None,
                        help="only this kernel (repeatable), default every kernel in the CSV")
    args = parser.parse_args(argv)
    if not Path(args.csv).exists():
        parser.error(f"--csv {args.csv}: no such file (run a benchmark first)")
    paths = common.plot_results(args.csv, args.out_dir, kernels=args.kernel)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("nothing to plot" + (f" for kernel(s) {args.kernel}" if args.kernel else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
