"""One-shot GPU check: build, conformance suite on the GPU, compute-sanitizer, benchmarks -> JSON.

Made for a bare lent GPU machine (torch and triton preinstalled, no network) and a fixed time
budget: every step has its own time limit, a failing step is recorded and the next one still
runs, and the summary JSON is written after every step so that a run cut short still reports.

    python3 benchmarks/gpu_check.py --out DIR            # on the GPU machine (< 8 minutes)
    python3 benchmarks/gpu_check.py --out DIR --dry-run  # here, on CPU: same steps, small sizes

Writes DIR/gpu_check.json (summary), DIR/bench.json (+ .png), DIR/bench_selective_ce.json and
DIR/logs.txt (every step's output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_step(name: str, cmd: list[str], timeout: int, out_dir: str, env: dict) -> dict:
    # One log file for all steps: the device tool brings back at most 8 files.
    log_path = os.path.join(out_dir, "logs.txt")
    t0 = time.time()
    print(f"== {name}: {' '.join(cmd)} (limit {timeout}s)", flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    took = round(time.time() - t0, 1)
    with open(log_path) as f:
        tail = f.read().rsplit(f"===== {name}:", 1)[-1][-3000:]
    print(f"   -> rc={rc} in {took}s\n{tail[-1500:]}", flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": took, "log": os.path.basename(log_path), "tail": tail}


def pytest_counts(tail: str) -> dict:
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed)", tail):
        counts[what] = int(n)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal with small sizes")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "logs.txt"), "w").close()
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    device = "cpu" if args.dry_run else "cuda"
    env["RHO_KERNELS_TEST_DEVICE"] = device
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env["RHO_KERNELS_FORCE_CUDA"] = "1"

    summary: dict = {"device": device, "dry_run": args.dry_run, "python": platform.python_version(), "steps": {}}

    def save():
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(summary, f, indent=2)

    probe = subprocess.run(
        [py, "-c", "import torch, json; import triton; print(json.dumps({'torch': torch.__version__, "
         "'triton': triton.__version__, 'cuda': torch.version.cuda, "
         "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    summary["environment"] = json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-2000:]}
    save()

    steps = []
    if not args.skip_build:
        steps.append(("build", [py, "setup.py", "build_ext", "--inplace"], 300))
    xdist = [] if args.dry_run else ["-n", "8"]
    tests = ["tests/test_conformance.py"] + [t for t in ("tests/test_triton_paths.py", "tests/test_selective.py")
                                             if os.path.exists(os.path.join(ROOT, t))]
    steps.append(("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, *tests], 600 if args.dry_run else 240))
    if not args.dry_run:
        steps.append(("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                                   py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_conformance.py",
                                   "-k", "cuda and (layouts or special or ignore_index or k_edges) and float32"], 150))
    # The target shapes, each in its dtype (fewer torch.compile(reference) builds than a full
    # shape x dtype grid); the dry run uses small stand-ins.
    if args.dry_run:
        bench_sets = [("bench", ["--shapes", "2048x3000,320x10", "--dtypes", "float32,bfloat16", "--repeats", "3"])]
    else:
        bench_sets = [("bench", ["--shapes", "16384x128256,4096x32000", "--dtypes", "bfloat16"]),
                      ("bench_small", ["--shapes", "320x10,3200x1000", "--dtypes", "float32"])]
    for bench_name, bench_args in bench_sets:
        steps.append((bench_name, [py, "-m", "rho_kernels", "bench", "--device", device, *bench_args,
                                   "--json", os.path.join(args.out, f"{bench_name}.json"),
                                   "--plot", os.path.join(args.out, f"{bench_name}.png")], 200))
    if os.path.exists(os.path.join(ROOT, "benchmarks", "bench_selective_ce.py")):
        steps.append(("bench_selective_ce", [py, "benchmarks/bench_selective_ce.py", "--device", device,
                                             *(["--cases", "2x64x1000", "--repeats", "2"] if args.dry_run else []),
                                             "--json", os.path.join(args.out, "bench_selective_ce.json")], 150))

    for name, cmd, limit in steps:
        result = run_step(name, cmd, limit, args.out, env)
        if name in ("tests", "memcheck"):
            result["counts"] = pytest_counts(result["tail"])
        summary["steps"][name] = result
        save()
    for name in ("bench.json", "bench_small.json", "bench_selective_ce.json"):
        path = os.path.join(args.out, name)
        if os.path.exists(path):
            with open(path) as f:
                summary[name.replace(".json", "")] = json.load(f)
    summary["ok"] = all(s["rc"] == 0 for s in summary["steps"].values())
    save()
    print(json.dumps({k: (v["rc"], v.get("counts")) for k, v in summary["steps"].items()}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
