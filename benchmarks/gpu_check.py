"""One-shot GPU check within one time budget: selftest, build, smoke, benchmarks, memcheck, selective CE, suite.

Made for a bare lent GPU machine (torch, triton, nvcc, pytest + xdist preinstalled, no network)
and a short window: ``--budget-s`` (default 420) is spent on the steps in priority order.  A step
runs only if the budget still holds its minimum, and is cut at ``min(its cap, what is left)``;
otherwise it is recorded as skipped, with the reason.  The summary JSON is rewritten after every
step, so a run cut short still reports.

    bash benchmarks/gpu_check.sh [--budget-s 420] [--wheels DIR]   # on the GPU machine
    python3 benchmarks/gpu_check.py --dry-run --out DIR               # on CPU: same steps, tiny shapes

Steps, in priority order:
  0 selftest     ``python -m rho_kernels selftest`` on what is installed (reference, Triton; the CUDA
                 kernel where a build is there already): a verdict even if a later step dies.  Its
                 table is in logs.txt, its JSON under ``results.selftest`` of gpu_check.json.
                 Dry run: the reference and cpu backends only (CI runs the full one on CPU)
  1 build        the extension for sm_90 only, all cores
  2 smoke        every launch path of every backend once against the reference
  3 bench        [16384, 128256] bf16, [4096, 32000] bf16: read floor, eager and compiled
                 reference, every backend, Liger-Kernel CE (reduction none) + torch.topk if it imports
    bench_softcap [16384, 256000] bf16 with Gemma 2's softcap=30 (its JSON under
                 ``results.bench_softcap`` of gpu_check.json)
  4 bench_small  [3200, 1000] fp32, [320, 10] fp32, the same columns
  5 memcheck     compute-sanitizer memcheck on a few CUDA and Triton cases
  6 selective_ce selective CE forward + backward at [8, 4096, 128256] bf16
  7 linear       linear_select / selective_linear_cross_entropy from hidden states at
                 [8 * 4096, 4096] x [128256, 4096] bf16 vs F.linear + the op (benchmarks/bench_linear.py)
  8 suite        the conformance suite (and the Triton path / selective CE tests), pytest -n

``--wheels DIR`` first installs the pure-Python wheels in DIR (e.g. liger_kernel) with
``pip --no-index --no-deps``.  Files written (at most 8, one folder): gpu_check.json, logs.txt,
bench.json, bench.png, bench_small.json, bench_small.png, selective_ce.json, linear.json.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = ["tests/test_conformance.py", "tests/test_triton_paths.py", "tests/test_selective.py"]


class Step(NamedTuple):
    name: str
    cmd: Optional[list[str]]  # None: skipped for ``why_not``
    min_s: float  # not started with less budget left than this
    cap_s: float  # never runs longer than this
    why_not: str = ""


def steps_for(args: argparse.Namespace, py: str, ncpu: int) -> list[Step]:
    """The budgeted plan, in priority order (GPU or dry run)."""
    dry = args.dry_run
    out = args.out
    dev = "cpu" if dry else "cuda"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    xdist = [] if dry else ["-n", str(min(ncpu, 16))]
    steps: list[Step] = []

    if args.wheels:
        wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
        steps.append(Step("wheels", [py, "-m", "pip", "install", "--no-index", "--no-deps", *wheels] if wheels else None,
                          5, 60, f"no *.whl in {args.wheels}"))

    selftest = [py, "-m", "rho_kernels", "selftest", "--device", dev, "--json", args.selftest_json]
    steps.append(Step("selftest", selftest + (["--backends", "reference,cpu"] if dry else []), 5 if dry else 20,
                      60 if dry else 120))

    if args.skip_build:
        steps.append(Step("build", None, 0, 0, "--skip-build"))
    elif dry:  # the CPU build takes minutes on CI's 2 cores: check the one that is there instead
        steps.append(Step("build", [py, "-c", "import rho_kernels, rho_kernels.backends._extension as e; "
                                              "print('extension:', e.LOAD_ERROR or 'loaded')"], 2, 60))
    else:
        steps.append(Step("build", [py, "setup.py", "build_ext", "--inplace"], 60, 240))

    # (2) smoke: Triton's launch paths (forced by plan overrides), every backend on the
    # conformance shapes in one dtype/method, the CE-gradient kernels.
    smoke_k = ("test_paths_all_methods_special_values and reducible"
               if not dry else "test_paths_all_methods_special_values and reducible and (fused_ticket or split_v)")
    conf_k = "test_scores_and_selection and reducible and float32" + (" and 3x7" if dry else "")
    smoke_expr = f"({smoke_k}) or ({conf_k}) or test_ce_grad_rows_op"
    steps.append(Step("smoke", pytest + xdist + ["-x", *SUITE, "-k", smoke_expr], 20 if not dry else 5, 90))

    bench = [py, "-m", "rho_kernels", "bench", "--device", dev]
    if dry:
        sets = [("bench", "64x100", "float32"), ("bench_small", "32x10", "float32")]
        # bench refuses (exit 2) a named backend that cannot run: liger only where it imports
        liger = ",liger" if importlib.util.find_spec("liger_kernel") else ""
        bench += ["--repeats", "2", "--backends", "reference,cpu,triton" + liger]
    else:
        sets = [("bench", "16384x128256,4096x32000", "bfloat16"), ("bench_small", "3200x1000,320x10", "float32")]
    for name, shapes, dtypes in sets:
        steps.append(Step(name, bench + ["--shapes", shapes, "--dtypes", dtypes,
                                         "--json", os.path.join(out, f"{name}.json"),
                                         "--plot", os.path.join(out, f"{name}.png")],
                          10 if dry else 40, 150))
        if name == "bench":  # Gemma 2's soft-capped head at its vocabulary (JSON into gpu_check.json)
            shape = "64x1000" if dry else "16384x256000"
            steps.append(Step("bench_softcap", bench + ["--shapes", shape, "--dtypes", "bfloat16", "--softcap", "30",
                                                        "--json", args.softcap_json],
                              10 if dry else 40, 150))

    sanitizer = shutil.which("compute-sanitizer") or (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"))
    if dry:
        steps.append(Step("memcheck", None, 0, 0, "dry run: compute-sanitizer needs a GPU"))
    elif not os.path.exists(sanitizer):
        steps.append(Step("memcheck", None, 0, 0, f"compute-sanitizer not found ({sanitizer})"))
    else:
        steps.append(Step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                                       "--target-processes", "all", *pytest, "-x", *SUITE[:2], "-k",
                                       "(test_special_values and float32 and (reducible or gradnorm)) or "
                                       "(test_paths_all_methods_special_values and entropy)"], 40, 120))

    ce = [py, "benchmarks/bench_selective_ce.py", "--device", dev, "--json", os.path.join(out, "selective_ce.json")]
    ce += ["--cases", "2x16x100:float32", "--repeats", "2", "--backends", "auto,reference"] if dry else \
        ["--cases", "8x4096x128256:bfloat16", "--repeats", "3"]
    steps.append(Step("selective_ce", ce, 5 if dry else 30, 120))

    # The LM-head ops (hidden states x head, logits never materialised) against F.linear + the op.
    lin = [py, "benchmarks/bench_linear.py", "--device", dev, "--json", os.path.join(out, "linear.json")]
    lin += (["--n", "64", "--d", "32", "--v", "100", "--dtypes", "float32", "--repeats", "1", "--tasks", "loss"] if dry else
            ["--n", str(8 * 4096), "--d", "4096", "--v", "128256", "--dtypes", "bfloat16", "--repeats", "3"])
    steps.append(Step("linear", lin, 5 if dry else 40, 180))

    suite_k = ["-k", "test_special_values or test_layouts"] if dry else []
    steps.append(Step("suite", pytest + xdist + [*SUITE, *suite_k], 10 if dry else 30, 600))
    return steps


def run_step(step: Step, timeout: float, log_path: str, env: dict) -> dict:
    """Run one step (own process group: a timeout kills pytest-xdist workers too)."""
    t0 = time.time()
    print(f"== {step.name}: {' '.join(step.cmd)} (limit {timeout:.0f} s)", flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {step.name}: {' '.join(step.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    took = round(time.time() - t0, 1)
    with open(log_path, errors="replace") as f:
        tail = f.read().rsplit(f"===== {step.name}:", 1)[-1][-3000:]
    print(f"   -> {status} in {took} s\n{tail[-1200:]}", flush=True)
    res = {"status": status, "rc": rc, "seconds": took, "limit_s": round(timeout, 1), "cmd": " ".join(step.cmd),
           "tail": tail}
    counts = pytest_counts(tail)
    if counts:
        res["counts"] = counts
    return res


def pytest_counts(tail: str) -> dict:
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", tail):
        counts[what] = int(n)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="all steps together (default 420)")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal with tiny shapes")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--wheels", help="install the *.whl in this folder first (pip --no-index --no-deps)")
    args = ap.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "logs.txt")
    # outside --out: the folder holds at most 8 files; its JSON goes into gpu_check.json
    extra = tempfile.mkdtemp(prefix="rho_gpu_check_")
    args.selftest_json = os.path.join(extra, "selftest.json")
    args.softcap_json = os.path.join(extra, "bench_softcap.json")
    open(log_path, "w").close()
    py = sys.executable
    ncpu = os.cpu_count() or 4
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["RHO_KERNELS_TEST_DEVICE"] = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"
        env["RHO_KERNELS_FORCE_CUDA"] = "1"
        env["MAX_JOBS"] = str(ncpu)

    summary: dict = {"device": env["RHO_KERNELS_TEST_DEVICE"], "dry_run": args.dry_run, "budget_s": args.budget_s,
                     "python": platform.python_version(), "order": [], "steps": {}}

    def save() -> None:
        summary["elapsed_s"] = round(time.time() - start, 1)
        tmp = os.path.join(args.out, "gpu_check.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(args.out, "gpu_check.json"))

    try:  # versions and GPU name; part of the budget, so bounded by it
        probe = subprocess.run(
            [py, "-c", "import json, torch, triton; print(json.dumps({'torch': torch.__version__, "
             "'triton': triton.__version__, 'cuda': torch.version.cuda, "
             "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(1.0, min(60.0, deadline - time.time())))
        summary["environment"] = (json.loads(probe.stdout) if probe.returncode == 0
                                  else {"error": probe.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        summary["environment"] = {"error": "version probe timed out"}
    save()

    for step in steps_for(args, py, ncpu):
        summary["order"].append(step.name)
        left = deadline - time.time()
        if step.cmd is None:
            res = {"status": "skipped", "reason": step.why_not}
        elif left < step.min_s:
            res = {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left, the step needs >= {step.min_s:.0f} s"}
        else:
            res = run_step(step, min(step.cap_s, left), log_path, env)
        if res["status"] == "skipped":
            print(f"== {step.name}: skipped ({res['reason']})", flush=True)
        summary["steps"][step.name] = res
        save()
        if step.name == "build" and res["status"] in ("failed", "timeout"):
            summary["note"] = "build failed: later steps run on whatever extension was there before"

    outside = {"selftest": args.selftest_json, "bench_softcap": args.softcap_json}
    for name in ("selftest", "bench", "bench_softcap", "bench_small", "selective_ce", "linear"):
        path = outside.get(name, os.path.join(args.out, f"{name}.json"))
        if os.path.exists(path):
            with open(path) as f:
                summary.setdefault("results", {})[name] = json.load(f)
    ran = [s for s in summary["steps"].values() if s["status"] != "skipped"]
    summary["ok"] = bool(ran) and all(s["status"] == "ok" for s in ran)
    save()
    print(json.dumps({k: (v["status"], v.get("counts"), v.get("reason")) for k, v in summary["steps"].items()}))
    print(f"gpu_check: {summary['elapsed_s']} s of {args.budget_s:.0f} s budget")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
