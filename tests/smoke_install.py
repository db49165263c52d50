"""Smoke test of an installed rho_kernels, run by tests/smoke_install.sh from a directory outside
the source tree with the virtual environment's Python.  Exits non-zero on the first failure."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch


def check(cond: bool, what: str, why: object = "") -> None:
    """Print "ok WHAT", or exit with "FAILED: WHAT (WHY)": WHY (an error, stderr) only explains a failure."""
    if not cond:
        sys.exit(f"smoke: FAILED: {what}" + (f" ({why})" if why not in (None, "") else ""))
    print(f"smoke: ok   {what}")


def main() -> None:
    import rho_kernels as rk
    from rho_kernels.backends import _extension

    pkg = os.path.dirname(os.path.abspath(rk.__file__))
    source = os.path.abspath(os.environ.get("SMOKE_SOURCE_TREE", "/nonexistent"))
    check(pkg.startswith(os.path.abspath(sys.prefix) + os.sep) and not pkg.startswith(source + os.sep),
          f"rho_kernels imported from the venv ({pkg}), not the source tree")
    check(rk.__version__ == importlib.metadata.version("rho_kernels"),
          f"__version__ {rk.__version__} matches the installed metadata")
    check(_extension.LOAD_ERROR is None, "the extension loaded", _extension.LOAD_ERROR)
    record = _extension.BUILD_RECORD or {}
    check(record.get("torch") == str(torch.__version__) and _extension.BUILD_RECORD_PATH.startswith(pkg),
          f"build record beside the installed _C says torch {record.get('torch')}")
    backends = rk.available_backends("cpu")
    check("cpu" in backends and "reference" in backends, f"available_backends('cpu') = {backends}")

    g = torch.Generator().manual_seed(0)
    cases = 0
    for n, v in ((37, 11), (256, 1000), (3, 5)):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
            targets = torch.randint(0, v, (n,), generator=g)
            targets[0] = -100  # one ignored row: ineligible on every backend
            il = torch.rand(n, generator=g)
            for method in rk.METHODS:
                k = max(1, n // 3)
                got = rk.select(logits, targets, il, k, method=method, backend="cpu")
                want = rk.select(logits, targets, il, k, method=method, backend="reference")
                ok = torch.equal(got.valid, want.valid) and torch.equal(got.indices[got.valid], want.indices[want.valid])
                ok = ok and torch.allclose(got.scores[got.valid], want.scores[want.valid], rtol=1e-4, atol=1e-4)
                if not ok:
                    sys.exit(f"smoke: FAILED: select({n}x{v}, {dtype}, {method}) differs from the reference:\n"
                             f"{got}\n{want}")
                cases += 1
    check(True, f"select on the cpu backend equals the reference ({cases} cases)")

    out = os.path.abspath("bench.json")
    proc = subprocess.run([sys.executable, "-m", "rho_kernels", "bench", "--device", "cpu", "--shapes", "64x50",
                           "--dtypes", "float32", "--backends", "reference,cpu", "--repeats", "2", "--json", out],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    check(proc.returncode == 0, "python -m rho_kernels bench exits 0", proc.stderr[-2000:])
    with open(out) as f:
        env = json.load(f)["environment"]
    check(env["info"]["extension"]["loaded"] and env["info"]["rho_kernels"] == rk.__version__,
          "the bench JSON's environment holds the info report")

    proc = subprocess.run([sys.executable, "-m", "rho_kernels", "info"], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    check(proc.returncode == 0 and not proc.stderr.strip(), "python -m rho_kernels info exits 0, quietly", proc.stderr[-2000:])
    check(f"torch {torch.__version__} (same as installed)" in proc.stdout, "info: built against the installed torch")
    import rho_kernels.benchmark, rho_kernels.info, rho_kernels.backends.triton_select  # noqa: F401,E401
    outside = sorted(name for name, mod in list(sys.modules.items()) if name.split(".")[0] == "rho_kernels"
                     and getattr(mod, "__file__", None) and not os.path.abspath(mod.__file__).startswith(pkg + os.sep))
    check(not outside, "every rho_kernels module loaded comes from the installed package", f"not: {outside}")
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
