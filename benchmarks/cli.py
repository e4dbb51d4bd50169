"""The command line every bench script (and run_all.py) shares: its flags and the end of a run.

    args = cli.parse_args(__doc__.splitlines()[0], argv)   # --device, --quick, --out, ...
    ...
    cli.finish(args, kernels=KERNELS)                      # the PNGs, unless --no-plot

On CPU a script re-executes itself once with glibc told to keep freed memory (keep_freed_memory),
unless --fresh-pages.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import plot_results  # noqa: E402
from results_csv import BENCH_DIR, DEFAULT_CSV  # noqa: E402
from timing import TimingConfig  # noqa: E402


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every bench script (and run_all.py) takes."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repetitions: a smoke test, not a measurement")
    parser.add_argument("--out", default=str(DEFAULT_CSV),
                        help=f"CSV to append results to (default: {DEFAULT_CSV.relative_to(BENCH_DIR.parent)})")
    parser.add_argument("--no-plot", action="store_true", help="do not draw PNGs after the run (they go next to the --out CSV)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: all available here)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed repetitions per measurement (default: 0.5)")
    parser.add_argument("--min-reps", type=int, default=None,
                        help="repetitions per measurement, at least (default: 10 CPU, 20 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; default: torch's default)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="CPU: let glibc return freed memory to the OS, so large outputs are page-faulted "
                             "in on every call (default: keep freed memory, see keep_freed_memory)")
    parser.add_argument("--skip-ceilings", action="store_true",
                        help="do not measure copy bandwidth / matmul ceilings; use the latest ones in --out")
    return parser


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common flags (and those extra_args(parser) adds, for one script's own options)."""
    parser = add_common_args(argparse.ArgumentParser(description=description))
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    if argv is None and args.device == "cpu" and not args.fresh_pages:
        keep_freed_memory()
    return check_args(parser, args)


# glibc returns every freed block larger than 32 MB to the OS, and the next allocation of the
# same size is mapped again page by page, so a large output's page faults can cost more than the
# kernel that writes it; whether a given size takes that path depends on the allocation history
# (glibc adapts its threshold), so CPU figures would depend on what ran before. Like PyTorch's
# CUDA caching allocator, keep freed memory: every provider then pays for its kernel, not for
# the kernel's page faults. --fresh-pages measures the other regime.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def keep_freed_memory() -> None:
    """Re-execute this script once with glibc's malloc set to keep freed memory (Linux only)."""
    if not sys.platform.startswith("linux") or os.environ.get("FUSEDTX_BENCH_MALLOC") == "keep":
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY) if t)
    env = dict(os.environ, GLIBC_TUNABLES=tunables, FUSEDTX_BENCH_MALLOC="keep")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to this PyTorch "
                     f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    args.device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    args.timing = TimingConfig.for_device(args.device, quick=args.quick, min_time=args.min_time, min_reps=args.min_reps)
    return args


def forward_args(args: argparse.Namespace) -> list[str]:
    """The command-line flags that reproduce the common options of args (for subprocesses)."""
    argv = ["--device", args.device.type, "--out", str(args.out)]
    if args.quick:
        argv.append("--quick")
    if args.no_plot:
        argv.append("--no-plot")
    if args.providers:
        argv += ["--providers", ",".join(args.providers)]
    if args.min_time is not None:
        argv += ["--min-time", str(args.min_time)]
    if args.min_reps is not None:
        argv += ["--min-reps", str(args.min_reps)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.skip_ceilings:
        argv.append("--skip-ceilings")
    if args.fresh_pages:
        argv.append("--fresh-pages")
    return argv


def finish(args: argparse.Namespace, kernels: Sequence[str] | None = None) -> None:
    """End of a bench script: draw the plots unless --no-plot."""
    if args.no_plot or not args.out or not Path(args.out).exists():
        return
    out_dir = Path(args.out).resolve().parent
    for path in plot_results(args.out, out_dir, kernels=kernels):
        print(f"wrote {path}")
