"""Measure the device's two ceilings (copy bandwidth, matmul rate) and append them to the CSV.

    python benchmarks/ceilings.py --device cuda --out OUT/results.csv

Every benchmark figure is compared with these as well as with its peers; run_all.py measures
them itself unless given --skip-ceilings (gpu_check.sh measures them first, before the build).
The bench scripts measure them through get_ceilings, or read the latest ones back from the CSV.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli  # noqa: E402
from results_csv import Recorder, device_name, read_rows  # noqa: E402
from timing import MB, TimingConfig, rate, time_fn  # noqa: E402


def measure_ceilings(rec: Recorder, config: TimingConfig | None = None, quick: bool = False) -> dict:
    """Measure copy bandwidth and matmul rate on rec.device, add them as kernel="ceiling" rows,
    and return {"copy_bandwidth": GB/s p50 of copy_, "matmul": TFLOP/s p50}.

    Copy: a large fp32 tensor (128 MB on CPU, 1 GB on CUDA: far beyond any cache),
    bytes read + written counted. `copy_` into a preallocated tensor is the device's bandwidth,
    the ceiling figures are compared with. `clone` allocates its output like the ops do and is
    recorded too: on CPU a fresh large allocation is mapped page by page, which costs more than
    the copy itself, and every op that returns a new large tensor pays it. Matmul: fp32 2048^3
    on CPU, bf16 8192^3 on CUDA.
    """
    device = rec.device
    config = config or TimingConfig.for_device(device, quick=quick)
    cuda = device.type == "cuda"
    result = {}

    nbytes = (1024 if cuda else 128) * MB
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for provider, fn in (("clone", src.clone), ("copy_", lambda: dst.copy_(src))):
        t = time_fn(fn, device=device, config=config)
        values = rate(2 * nbytes / 1e9, t)
        rec.add("ceiling", provider, "forward", "copy_bandwidth", "GB/s", "bytes", nbytes, values,
                src.dtype, src.shape)
        if provider == "copy_":
            result["copy_bandwidth"] = values[0]
    del src, dst

    n = (8192 if cuda else 2048) // (4 if quick else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device=device, config=config)
    values = rate(2 * n ** 3 / 1e12, t)
    rec.add("ceiling", "torch.mm", "forward", "matmul", "TFLOP/s", "n", n, values, dtype, (n, n, n))
    result["matmul"] = values[0]
    rec.flush()
    return result


def latest_ceilings(path: str | Path, device: torch.device | str) -> dict:
    """The most recent ceiling measurements for this device in the CSV ({} if none)."""
    path = Path(path)
    if not path.exists():
        return {}
    name = device_name(device)
    rows = [r for r in read_rows(path) if r["kernel"] == "ceiling" and r["device"] == name]
    result = {}
    for metric, provider in (("copy_bandwidth", "copy_"), ("matmul", "torch.mm")):
        match = [r for r in rows if r["metric"] == metric and r["provider"] == provider]
        if match:
            result[metric] = max(match, key=lambda r: r["timestamp"])["p50"]
    return result


def get_ceilings(args, rec: Recorder) -> dict:
    """Measure the ceilings, or with --skip-ceilings (run_all measured them) read them back."""
    if args.skip_ceilings:
        return latest_ceilings(args.out, rec.device) if args.out else {}
    print(f"measuring device ceilings on {rec.device_name} ...", flush=True)
    ceilings = measure_ceilings(rec, quick=args.quick)
    print("  copy bandwidth {copy_bandwidth:.1f} GB/s, matmul {matmul:.2f} TFLOP/s".format(**ceilings), flush=True)
    return ceilings


def main(argv=None) -> None:
    args = cli.parse_args(__doc__.splitlines()[0], argv)
    rec = Recorder(args.out, args.device)
    ceilings = measure_ceilings(rec, config=args.timing, quick=args.quick)
    print(f"{rec.device_name}: copy bandwidth {ceilings['copy_bandwidth']:.1f} GB/s, "
          f"matmul {ceilings['matmul']:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
