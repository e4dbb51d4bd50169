"""Measure the device's two ceilings (copy bandwidth, matmul rate) and append them to the CSV.

    python benchmarks/ceilings.py --device cuda --out OUT/results.csv

Every benchmark figure is compared with these as well as with its peers; run_all.py measures
them itself unless given --skip-ceilings (gpu_check.sh measures them first, before the build).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    rec = common.Recorder(args.out, args.device)
    ceilings = common.measure_ceilings(rec, config=args.timing, quick=args.quick)
    print(f"{rec.device_name}: copy bandwidth {ceilings['copy_bandwidth']:.1f} GB/s, "
          f"matmul {ceilings['matmul']:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
