"""Command line: ``python -m rho_kernels bench [options]`` (see ``--help``)."""

import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m rho_kernels bench [--help] [options]\n\n"
              "commands:\n  bench   microbenchmark of the fused select op vs the reference")
        return 0 if len(sys.argv) >= 2 else 2
    if sys.argv[1] == "bench":
        from .benchmark import main as bench_main

        return bench_main(sys.argv[2:])
    print(f"unknown command {sys.argv[1]!r}; try: python -m rho_kernels bench --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
