"""Command line: `python -m fusedtx info`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedtx", description="fusedtx command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, usable backends, extension and Triton status")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
