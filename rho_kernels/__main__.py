"""Command line: ``python -m rho_kernels {bench,info,selftest} [options]`` (see ``--help``)."""

import os
import signal
import sys

USAGE = """usage: python -m rho_kernels {bench,info,selftest} [--help] [options]

commands:
  bench     microbenchmark of the fused select op vs the reference
  info      versions, the compiled extension, and which backends run on each device (and why not)
  selftest  every backend and launch path on this machine against the reference, in seconds
            ([--device cuda] [--json PATH]; exit status 1 on any failure)"""


def main() -> int:
    try:
        code = _run()
        sys.stdout.flush()  # here, not at exit: a closed pipe is then this BrokenPipeError
    except BrokenPipeError:
        # The reader went away (`info --json | head`): stop quietly, as `cat` does, with the
        # status of a SIGPIPE death; stdout goes to /dev/null so that the exit's flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


def _run() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return 0 if len(sys.argv) >= 2 else 2
    if sys.argv[1] == "bench":
        from .benchmark import main as bench_main

        return bench_main(sys.argv[2:])
    if sys.argv[1] == "info":
        from .info import main as info_main

        return info_main(sys.argv[2:])
    if sys.argv[1] == "selftest":
        from .selftest import main as selftest_main

        return selftest_main(sys.argv[2:])
    print(f"unknown command {sys.argv[1]!r}; try: python -m rho_kernels --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
