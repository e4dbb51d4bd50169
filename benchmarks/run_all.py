"""Run every benchmarks/bench_*.py with the same flags, then draw the plots.

    python benchmarks/run_all.py                          # everything, on cuda if available
    python benchmarks/run_all.py --device cpu --quick --out /tmp/bench_test.csv
    python benchmarks/run_all.py --only softmax,layer_norm

The device ceilings (copy bandwidth, matmul rate) are measured once here and appended to the
CSV; each bench script then runs in its own process (fresh torch.compile caches and GPU memory)
with --skip-ceilings, reading them back for its summary. One failing script does not stop the
others; the exit status is non-zero if any failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import get_ceilings  # noqa: E402
from cli import add_common_args, check_args, finish, forward_args  # noqa: E402
from results_csv import BENCH_DIR, Recorder  # noqa: E402


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        names = {p.stem.removeprefix("bench_"): p for p in scripts}
        unknown = [o for o in only if o not in names]
        if unknown:
            raise SystemExit(f"--only: no benchmarks/bench_<name>.py for {unknown}; have {sorted(names)}")
        scripts = [names[o] for o in only]
    return scripts


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--only", default=None, help="comma-separated bench names (e.g. softmax), default all")
    args = check_args(parser, parser.parse_args(argv))
    scripts = discover([o.strip() for o in args.only.split(",") if o.strip()] if args.only else None)

    if not args.skip_ceilings:
        rec = Recorder(args.out, args.device)
        get_ceilings(args, rec)

    # Children re-measure nothing shared and draw nothing: plots are drawn once, at the end.
    child_args = forward_args(args)
    child_args = [a for a in child_args if a not in ("--no-plot", "--skip-ceilings")] + ["--no-plot", "--skip-ceilings"]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} {' '.join(child_args)}", flush=True)
        started = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script), *child_args])
        print(f"=== {script.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - started:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(script.name)

    finish(args)  # every kernel's plots
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
