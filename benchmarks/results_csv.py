"""The results CSV: its schema, and the rows of one run.

    rec = Recorder(args.out, device)                     # one run = one timestamp
    rec.add("softmax", "fusedtx_native", "forward", "bandwidth", "GB/s", "N", 4096,
            rate(nbytes / 1e9, timing), dtype, shape)
    rec.flush()                                          # append to the CSV

benchmarks/results/results.csv has the columns CSV_COLUMNS. p50/p20/p80 hold the *metric*
computed from the 50th/20th/80th percentile of *time*: for a throughput metric (GB/s, TFLOP/s)
p20 >= p50 >= p80, p20 being the faster end; for time-like metrics (ms, us) p20 <= p80.
"""
from __future__ import annotations

import csv
import datetime
import sys
from pathlib import Path
from typing import Sequence

import torch

try:
    import fusedtx
except ImportError:  # running from a checkout that is not pip-installed: use the repo's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fusedtx

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CSV = RESULTS_DIR / "results.csv"

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
               "dtype", "shape", "device", "fusedtx_version", "torch_version", "timestamp", "isa")
MODES = ("forward", "backward", "full")


def device_name(device: torch.device | str) -> str:
    """What the CSV's `device` column holds: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine() or "unknown CPU"
    # torch's intra-op thread count is what the benchmarks run with (the native kernels use
    # at::parallel_for, so the same count).
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def cpu_isa(device: torch.device | str) -> str:
    """What the CSV's `isa` column holds: on CPU, the vector path fusedtx's native kernels were
    compiled for ("avx512", "avx2", "neon", "scalar": `python -m fusedtx info`); empty on GPUs
    and where the extension is not loaded (rows from before the column existed are empty too)."""
    if torch.device(device).type != "cpu":
        return ""
    from fusedtx import _extension

    return _extension.status().cpu_isa or ""


def now_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_rows(rows: Sequence[dict], path: str | Path = DEFAULT_CSV) -> None:
    """Append rows (dicts with CSV_COLUMNS keys) to the CSV, creating it with a header if missing."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header {header} does not match the schema {list(CSV_COLUMNS)}; "
                             "write to another file with --out")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def read_rows(path: str | Path = DEFAULT_CSV) -> list[dict]:
    """The CSV's rows as dicts, with x_value/p50/p20/p80 as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for line, row in enumerate(rows, start=2):
        for key in ("x_value", "p50", "p20", "p80"):
            try:
                row[key] = float(row[key])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: {key} is {row[key]!r}, not a number "
                                 f"(a second header, or a row with the wrong number of columns?)") from None
    return rows


def fmt_value(v: float) -> str:
    return f"{v:.6g}"


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def dtype_str(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


class Recorder:
    """Collects the rows of one run (one device, one timestamp) and appends them to the CSV."""

    def __init__(self, out: str | Path | None, device: torch.device | str, timestamp: str | None = None):
        self.out = Path(out) if out else None
        self.device = torch.device(device)
        self.device_name = device_name(self.device)
        self.isa = cpu_isa(self.device)
        self.timestamp = timestamp or now_timestamp()
        self.rows: list[dict] = []   # every row of this run (for summaries)
        self._pending: list[dict] = []

    def add(self, kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str,
            x_value: float, values: tuple[float, float, float], dtype, shape) -> dict:
        p50, p20, p80 = values
        row = {
            "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "x_name": x_name, "x_value": x_value, "p50": fmt_value(p50), "p20": fmt_value(p20),
            "p80": fmt_value(p80), "dtype": dtype_str(dtype),
            "shape": shape if isinstance(shape, str) else shape_str(shape),
            "device": self.device_name, "fusedtx_version": fusedtx.__version__,
            "torch_version": torch.__version__, "timestamp": self.timestamp, "isa": self.isa,
        }
        self.rows.append(row)
        self._pending.append(row)
        return row

    def flush(self) -> None:
        """Append the rows added since the last flush (flushing often keeps partial runs)."""
        if self.out is not None:
            append_rows(self._pending, self.out)
        self._pending = []
