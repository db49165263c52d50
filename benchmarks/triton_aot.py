"""Compile every Triton kernel variant the launch planner can choose, for the GPUs people own
(sm_80, 86, 89, 90, 100, 120), with no GPU, and report each one's resources (registers, spills,
shared memory, compile seconds) against that architecture's per-block limits.

    python benchmarks/triton_aot.py --update benchmarks/results/triton_aot.json   # regenerate
    python benchmarks/triton_aot.py --json OUT [--reuse REPORT] [--cc 80,90] [--jobs N]
        [--cuda-build-log build/build.log]

Exit status 1 when a variant fails to compile, spills, needs more shared memory than one block
may have on its architecture, or more registers than one block's threads may hold
(registers x threads > 65536).

How the variants are found: the backends' own launch code (``triton_select_rows``,
``triton_score_rows``, the CE-gradient launcher in rho_kernels/backends/) runs on ``meta`` tensors over the shape table
below, with ``wrap_triton`` replaced by a recorder, so every launch it would make on a GPU is
captured with its exact arguments (the plan depends on shapes only, never on the GPU, so one
recording serves every target).  Triton's own argument binder turns each launch into what a GPU
run would compile (signature, constexprs incl. integer args equal to 1, divisibility attributes,
options); identical ones are compiled once, in parallel.  Resources come from the ``ptxas -v``
bundled with triton, run on the PTX that ``triton.compile`` produced.

The cache: every record carries the triton version and the hash of its kernel's source (the
kernel and every ``@triton.jit`` function and module constant it reaches, ``kernel_source_hash``).
``--reuse``/``--update`` take an earlier record instead of compiling only where triton version,
target, compile job and source hash all match, so after a kernel edit only that kernel's
variants compile again.  ``--update FILE`` keeps FILE's records of other triton versions (the
committed report holds one set per CI environment).

The CUDA extension's figures come from its build log (``-Xptxas=-v``) and go into the same report.

The interpreter (``TRITON_INTERPRET=1``, set by ``make test``) turns ``@triton.jit`` functions into
``InterpretedFunction`` objects that cannot be compiled, so the compile runs in a child process
without that variable.  tests/test_triton_aot.py runs this script and imports its checks.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The targets and their per-block limits: the opt-in maximum of shared memory per block
# (cudaDevAttrMaxSharedMemoryPerBlockOptin; the SM has 1 KB more) and 64 K registers per block
# on all of them.
TARGETS = {
    80: {"gpus": "A100, A30", "smem": 163 * 1024},
    86: {"gpus": "RTX 30xx, A10, A40, A6000", "smem": 99 * 1024},
    89: {"gpus": "RTX 40xx, L4, L40S, RTX 6000 Ada", "smem": 99 * 1024},
    90: {"gpus": "H100, H200, GH200", "smem": 227 * 1024},
    100: {"gpus": "B200, GB200", "smem": 227 * 1024},
    120: {"gpus": "RTX 50xx, RTX PRO 6000 Blackwell", "smem": 99 * 1024},
}
SMEM_LIMIT = {cc: t["smem"] for cc, t in TARGETS.items()}
REGS_PER_BLOCK = 65536
DEFAULT_CC = ",".join(map(str, TARGETS))

# Shape table: reaches every launch path (one-program, ticket, chunked, whole-row, small-V tile,
# split-V + merge, candidates + radix topk) for every method, dtype and layout.
VS = (1, 10, 1000, 1025, 4096, 8192, 16384, 32000, 65536, 128256, 262144)
NS = (1, 7, 320, 1000, 3200, 4096, 4097, 16384, 10**6)
DTYPES = ("float32", "bfloat16", "float16", "float64")
METHODS = (0, 1, 2, 3, 4)  # reducible, loss, irreducible, gradnorm, entropy
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Checks (pure functions, unit-tested in tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_FUNC = re.compile(r"(?:Compiling entry function|Function properties for)\s+'?([\w$.]+)'?(?: for '(sm_\w+)')?")


def parse_ptxas(text: str) -> dict[tuple[str, str], dict]:
    """``ptxas -v`` output -> {(function, arch): {registers, spill_stores, spill_loads, stack,
    static_smem}}.  Lines of one function follow its "Compiling entry function" line."""
    out: dict[tuple[str, str], dict] = {}
    cur: Optional[tuple[str, str]] = None
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            if m.group(2):
                cur = (m.group(1), m.group(2))
            elif cur is None or cur[0] != m.group(1):
                cur = (m.group(1), cur[1] if cur else "")
            out.setdefault(cur, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                 "static_smem": 0})
            continue
        if cur is None:
            continue
        rec = out[cur]
        if (m := _PTXAS_REGS.search(line)):
            rec["registers"] = int(m.group(1))
            if (s := _PTXAS_SMEM.search(line)):
                rec["static_smem"] = int(s.group(1))
        if (m := _PTXAS_SPILL.search(line)):
            rec["spill_stores"] = max(rec["spill_stores"], int(m.group(1)))
            rec["spill_loads"] = max(rec["spill_loads"], int(m.group(2)))
        if (m := _PTXAS_STACK.search(line)):
            rec["stack"] = max(rec["stack"], int(m.group(1)))
    return out


def problems(rec: dict) -> list[str]:
    """Why a compiled variant cannot run well (empty list: fine).  ``rec`` is a report record."""
    if rec.get("error"):
        return [f"compile error: {rec['error'][-400:]}"]
    out = []
    cc = rec["cc"]
    if rec["spill_stores"] or rec["spill_loads"]:
        out.append(f"spills ({rec['spill_stores']} B stores, {rec['spill_loads']} B loads)")
    limit = SMEM_LIMIT[cc]
    if rec["shared_bytes"] > limit:
        out.append(f"shared memory {rec['shared_bytes']} B > {limit} B per block on sm_{cc}")
    threads = rec.get("threads") or 0
    if rec["registers"] * threads > REGS_PER_BLOCK:
        out.append(f"{rec['registers']} registers x {threads} threads > {REGS_PER_BLOCK}")
    return out


# ----------------------------------------------------------------------------------------------
# Variants: the planner's own launches, recorded on meta tensors
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for ``wrap_triton``: ``wrap_triton(kernel)[grid](*args, **kw)`` is recorded."""

    def __init__(self) -> None:
        self.launches: list[tuple[Any, tuple, tuple, dict]] = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append((kernel, tuple(grid), args, kwargs))
                return launch

        return _Grid()


def _cases() -> Iterable[tuple[str, tuple[int, ...], str, int, int]]:
    """(op, logits shape, dtype, method, k) over the table; k decides the candidate path."""
    for dtype, v, n in itertools.product(DTYPES, VS, NS):
        if n * v > 2**40:
            continue
        for method in METHODS:
            yield "score", (n, v), dtype, method, 0
            for k in sorted({1, max(1, n // 10), n}):
                yield "select", (n, v), dtype, method, k
        if n % 8 == 0 and n > 8:  # [B, T, V]: other strides (64-bit ones at large sizes)
            yield "score", (8, n // 8, v), dtype, 3, 0
            yield "select", (8, n // 8, v), dtype, 3, max(1, n // 10)
    for rows, v, dtype, what in _linear_blocks():
        if what == "score":
            for method in METHODS:
                yield "score", (rows, v), dtype, method, 0


# The linear ops (hidden states x LM head) launch the same kernels on [chunk, V] logits blocks,
# chunk as rho_kernels.linear picks it on a GPU: the GPU check's [8 * 4096, 4096] x [128256, 4096]
# bf16 case (score and select: every chunk; the Rho-1 loss's backward: its selected rows).
LINEAR_CASES = ((8 * 4096, 128256, "bfloat16", 0.6), (8 * 4096, 32000, "float32", 0.6))


def _linear_blocks() -> Iterable[tuple[int, int, str, str]]:
    """(rows, V, dtype, "score" | "ce_grad") of every distinct logits block of LINEAR_CASES."""
    import torch

    from rho_kernels import linear

    for n, v, dtype, ratio in LINEAR_CASES:
        dt = getattr(torch, dtype)
        for rows, what in ((n, "score"), (linear.max_selected(n, ratio), "ce_grad")):
            chunk = linear.chunk_rows(rows, v, dt, torch.device("cuda"), None)
            for r in sorted({chunk, rows - (rows // chunk) * chunk} - {0}):
                yield r, v, dtype, what


def _ce_cases() -> Iterable[tuple[tuple[int, ...], str]]:
    for dtype, v, n in itertools.product(DTYPES, VS, (1, 4096)):
        yield (n, v), dtype
        yield (2, max(n // 2, 1), v), dtype
    for rows, v, dtype, what in _linear_blocks():
        if what == "ce_grad":
            yield (rows, v), dtype


def record_launches() -> list[tuple[str, Any, tuple, dict, str]]:
    """Every launch the planner makes over the table on a GPU (any: the plan depends on shapes
    only): (kernel name, kernel, args, kwargs, example case)."""
    from unittest import mock

    import torch

    from rho_kernels.backends import triton_ce_grad as tce
    from rho_kernels.backends import triton_select as ts

    rec = _Recorder()
    meta = torch.device("meta")
    out = []
    with mock.patch.object(ts, "wrap_triton", rec), mock.patch.object(tce, "wrap_triton", rec):
        for op, shape, dtype, method, k in _cases():
            n = 1
            for s in shape[:-1]:
                n *= s
            logits = torch.empty(shape, dtype=getattr(torch, dtype), device=meta)
            targets = torch.empty((n,), dtype=torch.int64, device=meta)
            il = torch.empty((n,), dtype=torch.float32, device=meta) if method in (0, 2) else None
            start = len(rec.launches)
            if op == "score":
                ts.triton_score_rows._init_fn(logits, targets, il, method, IGNORE_INDEX)
            else:
                ts.triton_select_rows._init_fn(logits, targets, il, k, method, IGNORE_INDEX)
            case = f"{op} {list(shape)} {dtype} method={method}" + (f" k={k}" if op == "select" else "")
            out += [(kern.__name__, kern, a, kw, case) for kern, _, a, kw in rec.launches[start:]]
        for shape, dtype in _ce_cases():
            n = 1
            for s in shape[:-1]:
                n *= s
            logits = torch.empty(shape, dtype=getattr(torch, dtype), device=meta)
            targets = torch.empty((n,), dtype=torch.int64, device=meta)
            lse_dt = torch.float64 if dtype == "float64" else torch.float32
            lse = torch.empty((n,), dtype=lse_dt, device=meta)
            scale = torch.empty((n,), dtype=lse_dt, device=meta)
            start = len(rec.launches)
            tce._launch(logits, torch.empty(shape, dtype=logits.dtype, device=meta), targets, lse, scale,
                        IGNORE_INDEX)
            case = f"ce_grad {list(shape)} {dtype}"
            out += [(kern.__name__, kern, a, kw, case) for kern, _, a, kw in rec.launches[start:]]
        # The logit transform's variants (TRANSFORM=1 scale, 2 soft-cap; ZSUM; GENERAL ce_grad).
        for op, shape, dtype, method, k, softcap, scale in TRANSFORM_CASES:
            logits = torch.empty(shape, dtype=getattr(torch, dtype), device=meta)
            targets = torch.empty((shape[0],), dtype=torch.int64, device=meta)
            il = torch.empty((shape[0],), dtype=torch.float32, device=meta) if method in (0, 2) else None
            start = len(rec.launches)
            if op == "score":
                ts.triton_score_rows._init_fn(logits, targets, il, method, IGNORE_INDEX, softcap, scale, True)
            elif op == "select":
                ts.triton_select_rows._init_fn(logits, targets, il, k, method, IGNORE_INDEX, softcap, scale)
            else:
                lse = torch.empty((shape[0],), dtype=torch.float32, device=meta)
                tce._launch(logits, torch.empty_like(logits), targets, lse, lse, IGNORE_INDEX, softcap, scale,
                            0.1, 1e-4)
            case = f"{op} {list(shape)} {dtype} method={method} softcap={softcap} logit_scale={scale}"
            out += [(kern.__name__, kern, a, kw, case) for kern, _, a, kw in rec.launches[start:]]
    return out


# (op, shape, dtype, method, k, softcap, logit_scale): Gemma-2's soft-capped head (score with zsum
# on the whole-row and split-V paths, select two-stage and fused, the general CE gradient) and
# a scaled (Cohere-like) one.
TRANSFORM_CASES = (
    ("score", (16384, 256000), "bfloat16", 0, 0, 30.0, 1.0),
    ("score", (4, 256000), "bfloat16", 4, 0, 30.0, 1.0),
    ("select", (16384, 256000), "bfloat16", 0, 1638, 30.0, 1.0),
    ("select", (64, 1000), "float32", 3, 8, 30.0, 1.0),
    ("score", (8192, 32000), "float32", 1, 0, 0.0, 0.0625),
    ("ce_grad", (4096, 256000), "bfloat16", 0, 0, 30.0, 1.0),
)


def _variant_label(signature: dict, constexprs: dict, kernel, options: dict) -> str:
    names = kernel.arg_names
    parts = [f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())]
    ptr_types = sorted({t for t in signature.values() if t.startswith(("*fp", "*bf"))})
    return " ".join(parts + [f"num_warps={options['num_warps']}"] + ptr_types)


_ARG_NAMES: dict[str, tuple] = {}


def _declared_constexprs(kern) -> set[int]:
    return {i for i, p in enumerate(kern.params) if p.is_constexpr}


# ci level: constexprs folded into one job per class, compiling the value of highest rank, whose
# registers and shared memory bound the others' (arg: (class of a value, rank of a value)):
# the widest on-chip sort; the most V splits (only addressing and the merge tile grow; one split
# is the other code path); the scoring method with the most live accumulators (gradnorm, then
# entropy, then the CE methods: the fused select takes only those; the irreducible method reads
# no logits and stays its own class).  Every method still compiles
# once per kernel and dtype (the coverage pass of plan_variants).
_METHOD_RANK = {3: 3, 4: 2, 0: 1}  # gradnorm: dx and s2x; entropy: t; reducible: the IL
_FOLDED = {
    "_fused_select_kernel": {"N_P2": (lambda v: 0, lambda v: v),
                             "METHOD": (lambda v: 0, lambda v: _METHOD_RANK.get(v, 0))},
    "_score_kernel": {"SPLIT": (lambda v: v > 1, lambda v: v),
                      "METHOD": (lambda v: v == 2, lambda v: _METHOD_RANK.get(v, 0))},
    "_split_merge_kernel": {"SPLIT": (lambda v: 0, lambda v: v), "SPLIT_P2": (lambda v: 0, lambda v: v),
                            "METHOD": (lambda v: 0, lambda v: _METHOD_RANK.get(v, 0))},
}


def plan_variants(ccs: Iterable[int], level: str = "ci") -> tuple[list[dict], dict]:
    """Distinct compile jobs over the table, and how many launches / runtime variants they stand for.

    Every launch goes through triton's own binder, so ``exact`` counts what a GPU run would
    compile.  Jobs are coarser:

    * ``full``: one job per kernel, declared constexprs, pointer dtypes and options.  Integer
      arguments that triton specialises by value (== 1 becomes a constant, multiples of 16 get a
      divisibility hint) only fold constants; the most general launch (fewest specialisations,
      so the most registers) is compiled.
    * ``ci``: ``full``, with float16 folded into bfloat16 (same widths, same plan), and the
      constexprs in ``_FOLDED`` folded to their bounding value; then every (kernel, method,
      dtype) not compiled yet gets its smallest launch compiled, so no method's code goes
      uncompiled.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jobs: dict[tuple, dict] = {}
    smallest: dict[tuple, tuple] = {}
    exact: set = set()
    launches = 0
    recorded = record_launches()
    hashes: dict[str, str] = {}
    for cc in ccs:
        backend = make_backend(GPUTarget("cuda", cc, 32))
        binders: dict = {}
        for name, kern, args, kwargs, case in recorded:
            launches += 1
            if name not in binders:
                binders[name] = create_function_from_signature(kern.signature, kern.params, backend)
            bound, spec, opts = binders[name](*args, **kwargs)
            options, signature, constexprs, attrs = kern._pack_args(backend, dict(kwargs), bound, spec, opts)
            options = dict(options.__dict__)
            exact.add((cc, name, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
                       tuple(sorted((k, str(v)) for k, v in attrs.items())), options["num_warps"]))
            declared = _declared_constexprs(kern)
            key_c = {k: v for k, v in constexprs.items() if k[0] in declared}
            # an integer argument specialised to the constant 1 is an i32 argument otherwise
            key_sig = {k: ("i32" if v == "constexpr" and i not in declared else v)
                       for i, (k, v) in enumerate(signature.items())}
            if level == "ci":
                key_sig = {k: ("*bf16" if v == "*fp16" else v) for k, v in key_sig.items()}
                for arg, (cls, _) in _FOLDED.get(name, {}).items():
                    i = (kern.arg_names.index(arg),)
                    key_c[i] = ("folded", cls(key_c[i]))
            # non-declared constexprs are integer specialisations: fewer = more general
            generality = (-(len(constexprs) - len(key_c)), -sum(len(a) for a in attrs.values()))
            if level == "ci":
                generality = tuple(rank(constexprs[(kern.arg_names.index(arg),)])
                                   for arg, (_, rank) in _FOLDED.get(name, {}).items()) + generality
            key = (cc, kern.__module__, name, tuple(sorted(key_sig.items())),
                   tuple(sorted(key_c.items())), options["num_warps"], options["num_stages"])
            job = jobs.get(key)
            # coverage: (kernel, method, dtypes) -> its smallest launch
            cov = (cc, name, _method_of(kern, constexprs), tuple(sorted(key_sig.items())))
            _ARG_NAMES[name] = tuple(kern.arg_names)
            if name not in hashes:
                hashes[name] = kernel_source_hash(kern)
            new = {"cc": cc, "module": kern.__module__, "kernel": name, "signature": signature, "cov": cov,
                   "source_hash": hashes[name], "job_key": _digest(repr(key[2:])),
                   "constexprs": constexprs, "attrs": attrs, "options": options, "generality": generality,
                   "variant": _variant_label(signature, constexprs, kern, options)}
            if job is None or generality > job["generality"]:
                jobs[key] = {**new, "cases": [case] + (job["cases"] if job else [])}
            else:
                job["cases"].append(case)
            size = _tile_size(kern, constexprs)
            if cov not in smallest or size < smallest[cov][0]:
                smallest[cov] = (size, new, case)
    covered = {j["cov"] for j in jobs.values()}
    for cov, (_, new, case) in smallest.items():
        if cov not in covered:
            jobs[("cover",) + cov] = {**new, "cases": [case]}
    for job in jobs.values():
        del job["generality"], job["cov"]
    return list(jobs.values()), {"launches": launches, "runtime_variants": len(exact)}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kernel_source_hash(kern) -> str:
    """Hash of what a compile of ``kern`` reads from our sources: its own source and, transitively,
    every ``@triton.jit`` function and plain module constant (int/float/bool/str) it names."""
    from triton.runtime.jit import JITFunction

    parts: dict[str, str] = {}
    todo = [kern]
    while todo:
        f = todo.pop()
        qual = f"{f.fn.__module__}.{f.fn.__qualname__}"
        if qual in parts:
            continue
        src = textwrap.dedent(inspect.getsource(f.fn))
        parts[qual] = src
        glb = f.fn.__globals__
        for node in ast.walk(ast.parse(src)):
            val = None
            if isinstance(node, ast.Name):
                val, label = glb.get(node.id), node.id
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                mod = glb.get(node.value.id)
                if inspect.ismodule(mod) and not mod.__name__.startswith("triton"):
                    val, label = getattr(mod, node.attr, None), f"{mod.__name__}.{node.attr}"
            if isinstance(val, JITFunction):
                todo.append(val)
            elif isinstance(val, (bool, int, float, str)):
                parts[f"const {label}"] = repr(val)
    return _digest("\n".join(f"{k}\n{v}" for k, v in sorted(parts.items())))


def _method_of(kern, constexprs: dict) -> Optional[int]:
    if "METHOD" not in kern.arg_names:
        return None
    return constexprs[(kern.arg_names.index("METHOD"),)]


def _tile_size(kern, constexprs: dict) -> int:
    size = 1
    for arg in ("BLOCK_R", "BLOCK_V", "N_P2", "BLOCK", "CB"):
        if arg in kern.arg_names:
            size *= int(constexprs.get((kern.arg_names.index(arg),), 1))
    return size


# ----------------------------------------------------------------------------------------------
# Compile (worker processes, never under the interpreter)
# ----------------------------------------------------------------------------------------------


def _ptxas_path(cc: int) -> str:
    """The ptxas triton itself runs for ``cc`` (a separate ``ptxas-blackwell`` for sm_100+)."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def compile_job(job: dict) -> dict:
    """triton.compile for the job's target, then ``ptxas -v`` on its PTX."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = job["cc"]
    mod = importlib.import_module(job["module"])
    kern = getattr(mod, job["kernel"])
    rec = {"kernel": job["kernel"], "variant": job["variant"], "cc": cc, "triton": triton.__version__,
           "source_hash": job["source_hash"], "job_key": job["job_key"],
           "num_warps": job["options"]["num_warps"], "threads": 32 * job["options"]["num_warps"],
           "example": job["cases"][0], "cases": len(job["cases"])}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    # A cold compile: an empty cache directory per job (a warm ~/.triton/cache would report ~0 s).
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            src = ASTSource(kern, job["signature"], job["constexprs"], job["attrs"])
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=job["options"])
        except Exception as e:  # noqa: BLE001 - a compile error is a result, reported per variant
            rec.update(error=f"{type(e).__name__}: {e}", compile_s=round(time.perf_counter() - t0, 2),
                       compile_cpu_s=round(_cpu_seconds() - c0, 2))
            return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    # CPU seconds (this process + the ptxas triton ran): on a busy shared machine the wall
    # time above measures the load; this measures the compile.
    rec["compile_cpu_s"] = round(_cpu_seconds() - c0, 2)
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    arch = sm_arch_from_capability(cc)  # the name triton gives ptxas (sm_90a, sm_100a, ...)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([_ptxas_path(cc), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        rec["error"] = f"ptxas failed: {proc.stderr[-1000:]}"
        return rec
    figures = list(parse_ptxas(proc.stderr + proc.stdout).values())
    fig = figures[0] if figures else {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                      "static_smem": 0}
    rec.update(registers=fig["registers"], spill_stores=fig["spill_stores"], spill_loads=fig["spill_loads"],
               stack_bytes=fig["stack"],
               shared_bytes=int(compiled.metadata.shared) + fig["static_smem"])
    return rec


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(jobs: list[dict], n_procs: int, time_limit: Optional[float] = None) -> list[dict]:
    """Compile the jobs, longest-first, in ``n_procs`` spawned processes (fresh interpreters:
    MLIR contexts and the interpreter switch are per process)."""
    jobs = sorted(jobs, key=lambda j: -_cost_guess(j))
    out = []
    t0 = time.perf_counter()

    def progress(rec: dict) -> None:
        out.append(rec)
        print(f"[{len(out)}/{len(jobs)} {time.perf_counter() - t0:6.0f} s] {rec['compile_s']:6.2f} s "
              f"regs {rec.get('registers', '-')} {rec['kernel']} [{rec['variant']}] sm_{rec['cc']}"
              f"{' ERROR' if rec.get('error') else ''}", flush=True)

    if n_procs <= 1:
        for j in jobs:
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                break
            progress(compile_job(j))
    else:
        _compile_pool(jobs, n_procs, time_limit, t0, progress)
    _cut(jobs, out)
    return out


def _compile_pool(jobs: list[dict], n_procs: int, time_limit: Optional[float], t0: float, progress) -> None:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(n_procs, initializer=_worker_init) as pool:
        it = pool.imap_unordered(compile_job, jobs, chunksize=1)
        for _ in jobs:
            left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
            try:
                progress(it.next(timeout=left) if left is None or left > 0 else it.next(timeout=0))
            except mp.TimeoutError:
                pool.terminate()
                break


def _cut(jobs: list[dict], out: list[dict]) -> None:
    done = {(r["job_key"], r["cc"]) for r in out}
    for j in jobs:  # cut by --time-limit: listed, never counted as compiled
        if (j["job_key"], j["cc"]) not in done:
            out.append({"kernel": j["kernel"], "variant": j["variant"], "cc": j["cc"], "not_compiled": "time limit",
                        "source_hash": j["source_hash"], "job_key": j["job_key"],
                        "example": j["cases"][0], "cases": len(j["cases"]), "compile_s": None})


def _cost_guess(job: dict) -> int:
    # On-chip sorts dominate compile time (then wide tiles): schedule those first.
    kern = job["kernel"]
    c = {name: job["constexprs"].get((i,)) for i, name in enumerate(_ARG_NAMES.get(kern, ()))}
    sort = (c.get("N_P2") or 0) + (c.get("CB") or 0)
    return 64 * sort + (c.get("BLOCK_R") or 1) * (c.get("BLOCK_V") or c.get("BLOCK") or 1)


# ----------------------------------------------------------------------------------------------
# CUDA extension figures (from the nvcc build log, -Xptxas=-v)
# ----------------------------------------------------------------------------------------------


def cuda_records(build_log: str) -> list[dict]:
    """Our kernels' ``ptxas -v`` figures in the nvcc build log (namespace rho_cuda)."""
    with open(build_log, errors="replace") as f:
        text = f.read()
    out = []
    for (fn, arch), fig in sorted(parse_ptxas(text).items()):
        if "rho_cuda" not in fn:
            continue
        m = re.match(r"sm_(\d+)", arch or "")
        out.append({"kernel": _demangle(fn), "variant": fn, "cc": int(m.group(1)) if m else None,
                    "registers": fig["registers"], "spill_stores": fig["spill_stores"],
                    "spill_loads": fig["spill_loads"], "stack_bytes": fig["stack"],
                    "shared_bytes": fig["static_smem"], "compile_s": None})
    return out


def _demangle(name: str) -> str:
    try:
        proc = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or name
    except (OSError, subprocess.SubprocessError):
        return name


# ----------------------------------------------------------------------------------------------


def cache_key(rec: dict) -> tuple:
    """What must match for an earlier record to stand for a compile: triton, target, job, source,
    and the launch compiled for the job (a folded job's bounding launch changes with the planner)."""
    return rec.get("triton"), rec["cc"], rec.get("job_key"), rec.get("source_hash"), rec.get("variant")


def load_report(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run(ccs: list[int], n_procs: int, build_log: Optional[str], level: str = "ci",
        time_limit: Optional[float] = None, only: Optional[str] = None, reuse: Optional[dict] = None,
        compile_ccs: Optional[list[int]] = None) -> dict:
    """One run for the installed triton: a report with ``runs = {triton version: summary}``.
    ``compile_ccs``: compile only these targets' jobs that ``reuse`` lacks; the others' are
    listed under ``not_compiled`` as stale."""
    import torch
    import triton

    t0 = time.perf_counter()
    jobs, counts = plan_variants(ccs, level)
    if only:
        jobs = [j for j in jobs if re.search(only, f"{j['kernel']} {j['variant']}")]
    reused = []
    if reuse:  # records of an earlier run of the same kernel source, triton and target
        prev = {cache_key(r): r for r in reuse.get("triton_kernels", [])}
        keep = []
        for j in jobs:
            r = prev.get(cache_key({**j, "triton": triton.__version__}))
            (reused if r is not None else keep).append(r if r is not None else j)
        jobs = keep
    stale = []
    if compile_ccs is not None:
        stale = [{"kernel": j["kernel"], "variant": j["variant"], "cc": j["cc"], "source_hash": j["source_hash"],
                  "job_key": j["job_key"], "not_compiled": "stale: the reused report has no record of this "
                  "kernel source, and --compile-cc leaves it out"} for j in jobs if j["cc"] not in compile_ccs]
        jobs = [j for j in jobs if j["cc"] in compile_ccs]
    plan_s = time.perf_counter() - t0
    records = reused + compile_all(jobs, n_procs, time_limit) + stale
    wall = time.perf_counter() - t0
    skipped = [r for r in records if r.get("not_compiled")]
    records = [r for r in records if not r.get("not_compiled")]
    for r in records:
        r["problems"] = problems(r)
    ok = [r for r in records if not r.get("error")]
    fresh = [r for r in records if r not in reused]
    summary = {
        "torch": torch.__version__, "targets": [f"sm_{c}" for c in ccs],
        "processes": n_procs, "level": level, "variants": len(records), "reused_from_earlier_run": len(reused),
        "compiled": len(fresh), "launches": counts["launches"], "runtime_variants": counts["runtime_variants"],
        "plan_seconds": round(plan_s, 1), "wall_seconds": round(wall, 1),
        "compile_seconds_total": round(sum(r["compile_s"] for r in records), 1),
        "compile_cpu_seconds_total": round(sum(r.get("compile_cpu_s", 0) for r in records), 1),
        "compile_cpu_seconds_by_target": {f"sm_{c}": round(sum(r.get("compile_cpu_s", 0) for r in records
                                                               if r["cc"] == c), 1) for c in ccs},
        "failed": [f"{r['kernel']} [{r['variant']}] sm_{r['cc']}: {'; '.join(r['problems'])}"
                   for r in records if r["problems"]],
        "worst_registers": [_brief(r) for r in sorted(ok, key=lambda r: -r["registers"])[:5]],
        "worst_shared_bytes": [_brief(r) for r in sorted(ok, key=lambda r: -r["shared_bytes"])[:3]],
        "worst_compile_cpu_s": [_brief(r) for r in sorted(records, key=lambda r: -r.get("compile_cpu_s", 0))[:5]],
        "not_compiled": skipped,
    }
    report = {"targets": {f"sm_{c}": {**TARGETS[c], "smem_limit_bytes": SMEM_LIMIT[c]} for c in ccs},
              "runs": {triton.__version__: summary}, "triton_kernels": records}
    if build_log:
        cuda = cuda_records(build_log)
        for r in cuda:
            r["problems"] = problems({**r, "threads": 0}) if r["cc"] in SMEM_LIMIT else []
        report["cuda_build_log"] = os.path.relpath(build_log, ROOT) if os.path.isabs(build_log) else build_log
        report["cuda_kernels"] = cuda
        summary["failed"] += [f"CUDA {r['kernel']} sm_{r['cc']}: {'; '.join(r['problems'])}" for r in cuda if r["problems"]]
    return report


def _brief(r: dict) -> dict:
    return {k: r.get(k) for k in ("kernel", "variant", "cc", "registers", "threads", "shared_bytes", "compile_s",
                                  "compile_cpu_s")}


def merge(old: dict, new: dict) -> dict:
    """``old`` with the triton versions of ``new`` replaced by ``new``'s (others kept)."""
    versions = set(new["runs"])
    out = {**old, **{k: v for k, v in new.items() if k not in ("runs", "triton_kernels", "targets")}}
    out["targets"] = {**old.get("targets", {}), **new["targets"]}
    out["runs"] = {**{v: s for v, s in old.get("runs", {}).items() if v not in versions}, **new["runs"]}
    out["triton_kernels"] = [r for r in old.get("triton_kernels", []) if r.get("triton") not in versions] + \
        new["triton_kernels"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--update", metavar="REPORT", help="reuse REPORT's matching records, compile the rest and "
                    "write REPORT back (its records of other triton versions kept): the regeneration command")
    ap.add_argument("--cc", default=DEFAULT_CC, help=f"compute capabilities, comma-separated (default {DEFAULT_CC})")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--level", choices=("ci", "full"), default="ci",
                    help="how far variants are folded together (see plan_variants)")
    ap.add_argument("--time-limit", type=float, help="stop compiling after this many seconds (partial report: "
                    "the rest is listed under not_compiled; the exit status says nothing about them)")
    ap.add_argument("--only", help="compile only variants whose 'kernel variant' label matches this regex")
    ap.add_argument("--reuse", help="take this earlier report's records where triton, target, job and kernel "
                    "source hash match instead of compiling those variants")
    ap.add_argument("--compile-cc", help="compile only these targets' variants that --reuse lacks (the other "
                    "targets' missing ones are listed as stale, not compiled): the CI test")
    ap.add_argument("--cuda-build-log", help="nvcc build log with -Xptxas=-v output to add")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # @triton.jit under the interpreter yields uncompilable objects: run in a clean child.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    reuse_path = args.reuse or args.update
    old = load_report(reuse_path) if reuse_path and os.path.exists(reuse_path) else {}
    report = run([int(c) for c in args.cc.split(",")], args.jobs, args.cuda_build_log, args.level, args.time_limit,
                 args.only, old, [int(c) for c in args.compile_cc.split(",")] if args.compile_cc else None)
    (version, summary), = report["runs"].items()
    for path, rep in ((args.json, report), (args.update, merge(old, report) if args.update else None)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(rep, f, indent=1)
    print(f"triton {version}: {summary['variants']} variants ({summary['compiled']} compiled, "
          f"{summary['reused_from_earlier_run']} reused; of {summary['runtime_variants']} runtime variants, "
          f"{summary['launches']} launches) on {','.join(summary['targets'])} in {summary['wall_seconds']} s "
          f"wall with {args.jobs} processes (plan {summary['plan_seconds']} s, "
          f"compile CPU {summary['compile_cpu_seconds_by_target']})")
    for r in summary["worst_registers"]:
        print(f"  regs {r['registers']:3d} x {r['threads']:3d} thr  {r['kernel']} [{r['variant']}] sm_{r['cc']}")
    for r in summary["worst_shared_bytes"]:
        print(f"  smem {r['shared_bytes']:6d} B  {r['kernel']} [{r['variant']}] sm_{r['cc']}")
    for line in summary["failed"]:
        print("FAIL", line)
    for why in sorted({r["not_compiled"] for r in summary["not_compiled"]}):
        print(f"NOT COMPILED ({why}): {sum(r['not_compiled'] == why for r in summary['not_compiled'])} variants")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
