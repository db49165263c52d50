"""What this installation of rho_kernels is and can do: ``python -m rho_kernels info``.

Versions (package, Python, torch, Triton, CUDA), the compiled extension (loaded or why not, the
torch it was built against, the CPU instruction set its kernel runs with, the CUDA architectures
compiled in, whether the CUDA backend is verified on a GPU), and for each device which backends
run there and why the others do not.  ``collect()`` returns it as a dict, which every benchmark
JSON stores in its environment record; ``format_report()`` renders it for people.  Whether the
backends listed as available also compute the right answers here: ``python -m rho_kernels
selftest`` (``rho_kernels.selftest``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Optional

import torch

from . import backends
from ._version import __version__
from .backends import _extension, cpu

DEVICES = ("cpu", "cuda")


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError as exc:
        return f"not installed ({exc})"
    return str(triton.__version__)


def _extension_path() -> Optional[str]:
    try:
        spec = importlib.util.find_spec(_extension.EXT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _backends_on(device_type: str) -> dict[str, Any]:
    device = torch.device(device_type)
    no_device = device.type == "cuda" and not torch.cuda.is_available()
    reasons: dict[str, Optional[str]] = {}
    for name in backends.NAMES:
        reason = backends.unavailable_reason(name, device)
        # The reference "runs everywhere torch runs", but not on a device this machine lacks.
        reasons[name] = "no CUDA device is available" if no_device and reason is None else reason
    return {
        "auto": None if no_device else backends.auto_name(device),
        "available": [n for n, r in reasons.items() if r is None],
        "unavailable": {n: r for n, r in reasons.items() if r is not None},
    }


def collect() -> dict[str, Any]:
    """The installation's report as a JSON-serialisable dict."""
    record = _extension.BUILD_RECORD
    cuda_devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            cuda_devices.append({"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    get_cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {
        "rho_kernels": __version__,
        "package_path": os.path.dirname(os.path.abspath(__file__)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "torch_cpu_capability": get_cap() if get_cap else None,
        "cpu_threads": torch.get_num_threads(),
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": cuda_devices,
        "extension": {
            "loaded": _extension.LOAD_ERROR is None,
            "load_error": _extension.LOAD_ERROR,
            "path": _extension_path(),
            "build_record": record,
            "build_record_path": _extension.BUILD_RECORD_PATH,
            "built_against_torch": (record or {}).get("torch"),
            "cpu_kernel": _extension.has_kernel("CPU"),
            "cpu_instruction_set": cpu.instruction_set(),
            "cuda_kernel": _extension.has_kernel("CUDA"),
            "cuda_archs": (record or {}).get("cuda_archs"),
            "cuda_verified": _extension.CUDA_VERIFIED,
        },
        "backends": {d: _backends_on(d) for d in DEVICES},
    }


def format_report(info: dict[str, Any]) -> str:
    ext = info["extension"]
    record = ext["build_record"] or {}
    lines = [
        f"rho_kernels        {info['rho_kernels']}  ({info['package_path']})",
        f"python             {info['python']}  ({info['platform']})",
        f"torch              {info['torch']}  (CUDA {info['torch_cuda'] or 'none'}; "
        f"CPU capability {info['torch_cpu_capability']}; {info['cpu_threads']} threads)",
        f"triton             {info['triton']}" + ("  (TRITON_INTERPRET=1)" if info["triton_interpret"] else ""),
        "CUDA devices       " + (", ".join(f"{d['name']} (sm {d['capability']})" for d in info["cuda_devices"])
                                 or "none available"),
        "",
        "extension rho_kernels._C",
        f"  loaded           {'yes' if ext['loaded'] else 'no: ' + str(ext['load_error'])}",
        f"  path             {ext['path'] or '-'}",
    ]
    if ext["build_record"] is None:
        lines.append("  built against    unknown (no build record beside the extension)")
    else:
        built = ext["built_against_torch"]
        same = "same as installed" if str(built) == info["torch"] else f"installed is {info['torch']}"
        lines.append(f"  built against    torch {built} ({same}); compiler {record.get('compiler')}")
    lines.append(f"  CPU kernel       {ext['cpu_instruction_set'] or 'not available'}")
    if ext["cuda_kernel"] or record.get("with_cuda"):
        archs = ", ".join(ext["cuda_archs"] or []) or "unknown architectures (no build record)"
        toolkit = f" (CUDA toolkit {record['cuda_toolkit']})" if record.get("cuda_toolkit") else ""
        lines.append(f"  CUDA kernel      compiled for {archs}{toolkit}; "
                     f"verified on a GPU: {'yes' if ext['cuda_verified'] else 'no (auto never picks it)'}")
    else:
        lines.append("  CUDA kernel      not compiled in")
    for device, b in info["backends"].items():
        lines += ["", f"backends on {device} (auto -> {b['auto'] or '-'})"]
        lines += [f"  {name:<16} available" for name in b["available"]]
        lines += [f"  {name:<16} unavailable: {reason}" for name, reason in b["unavailable"].items()]
    lines += ["", "check them here against the reference: python -m rho_kernels selftest"
              + (" --device cuda" if info["cuda_available"] else "")]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rho_kernels info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
