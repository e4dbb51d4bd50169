"""`fusedtx.info()` / `python -m fusedtx info`: what this installation can run, and how."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends, config


def info(file=None) -> dict:
    """Print versions, devices, usable backends, extension and Triton status; return them as a dict."""
    from . import _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    ext = _extension.status()
    report = {
        "fusedtx": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "devices": {d: (torch.cuda.get_device_name(d) if d.startswith("cuda") else platform.processor() or platform.machine())
                    for d in devices},
        "cpu_threads": torch.get_num_threads(),
        "backends": {d: backends.available_backends(d) for d in devices},
        "default_backend": {d: backends.resolve(None, torch.device(d)) if _can_resolve(d) else None for d in devices},
        "extension": {"loaded": ext.loaded, "how": ext.how, "with_cuda": ext.with_cuda, "isa": ext.cpu_isa,
                      "error": ext.error, "note": ext.note},
        "triton_mode": backends.triton_mode(),
        "attention_split_size": config.get_split_size(),
    }
    out = file or sys.stdout
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}", file=out)
    return report


def _can_resolve(device: str) -> bool:
    try:
        backends.resolve(None, torch.device(device))
        return True
    except backends.BackendUnavailableError:
        return False
