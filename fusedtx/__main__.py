"""Command line: `python -m fusedtx info | check | demo`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedtx", description="fusedtx command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, usable backends, extension and Triton status")
    check_parser = sub.add_parser(
        "check", help="check batch invariance, generation consistency, on-policy logprobs, training "
                      "determinism and continuous batching on every backend, beside plain PyTorch",
        description="Run fusedtx's promises on a small GPT with random weights, on every backend "
                    "usable here and on the same model in plain PyTorch; exit code 1 if a fusedtx "
                    "backend breaks one.")
    demo_parser = sub.add_parser(
        "demo", help="train a tiny character-level GPT for a minute, then sample from it at batch sizes 1, 4 and 16",
        description="Train a tiny character-level GPT on the Python standard library's source, save "
                    "a checkpoint, and show that a prompt's completion is the same at batch sizes 1, 4 and 16.")
    from . import check, demo

    check.add_arguments(check_parser)
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
        return 0
    if args.command == "check":
        return check.main(args)
    if args.command == "demo":
        return demo.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
