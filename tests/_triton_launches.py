"""Record the Triton backend's launches without running them, and compile them ahead of time.

Shared by tests/test_triton_launch.py (in-process recording on meta tensors) and run as a
script there (``python tests/_triton_launches.py``, with TRITON_INTERPRET=0) to compile the
recorded launches for sm_90 and print the TTGIR layouts of each row reduction as JSON.  No GPU
is needed: Triton compiles for a target given by name, with its bundled ptxas.
"""

from __future__ import annotations

import json
import re
import sys
from typing import NamedTuple

import torch


class Launch(NamedTuple):
    kernel: object
    grid: tuple
    device: torch.device
    args: dict  # runtime arguments by name
    constexprs: dict  # constexpr arguments by name
    num_warps: int

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__


# A table of (n, v, dtype, layout) that reaches every launch path (the test checks it does).
CASES = [
    (3, 1000, torch.float32, "contiguous"),  # fused, one program, small-V tile
    (320, 10, torch.float32, "contiguous"),  # fused, one program, 128-row tile
    (256, 1000, torch.float32, "contiguous"),  # fused with the ticket
    (256, 4096, torch.bfloat16, "contiguous"),  # fused, whole row per program, 8 warps
    (256, 8192, torch.float32, "contiguous"),  # fused, whole row, 16 warps
    (600, 32001, torch.bfloat16, "contiguous"),  # two stages (beyond FUSED_MAX_ROWS), chunked V
    (3200, 1000, torch.float32, "contiguous"),  # two stages
    (9000, 1000, torch.bfloat16, "contiguous"),  # two stages with per-block candidates (small k)
    (2000, 128256, torch.bfloat16, "contiguous"),  # two stages, chunked V
    (4, 128256, torch.bfloat16, "contiguous"),  # split-V
    (100, 7, torch.float64, "contiguous"),  # float64
    (256, 300, torch.float32, "transposed"),  # column tiles, fused with the ticket
    (200, 203, torch.float32, "transposed"),  # column tiles, fused, one program
    (5000, 203, torch.bfloat16, "transposed"),  # column tiles, two stages
    (40, 32000, torch.float32, "transposed"),  # column tiles, split-V
    (2, 9, torch.float32, "transposed"),  # transposed but too few rows for column tiles
]


def case_k(n: int) -> int:
    """The k each case selects (small enough for per-block candidates on large N)."""
    return max(1, min(n // 10, 200))


def logits_for(n: int, v: int, dtype: torch.dtype, layout: str, device="meta") -> torch.Tensor:
    if layout == "transposed":
        return torch.empty((v, n), dtype=dtype, device=device).t()
    return torch.empty((n, v), dtype=dtype, device=device)


def record(ts, monkeypatch_setattr, fn, *args) -> list[Launch]:
    """Launches ``fn(*args)`` makes through ts._launch, recorded instead of run."""
    launches: list[Launch] = []

    def fake_launch(kernel, grid, device, *a, **kw):
        names = list(kernel.arg_names)
        num_warps = kw.pop("num_warps")
        const = {k: kw.pop(k) for k in list(kw) if k in names}
        assert not kw, f"unexpected launch options {kw}"
        launches.append(Launch(kernel, tuple(grid), device, dict(zip(names, a)), const, num_warps))

    monkeypatch_setattr(ts, "_launch", fake_launch)
    fn(*args)
    return launches


def problem(n, v, dtype, layout, method=0, device="meta"):
    logits = logits_for(n, v, dtype, layout, device)
    targets = torch.zeros((n,), dtype=torch.int64, device=device)
    il = torch.zeros((n,), dtype=torch.float32, device=device)
    return logits, targets, il, method, -100


# ------------------------------------------------------------------------------------- AOT

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
                 torch.bool: "i1"}


def compile_launch(launch: Launch, arch: int = 90):
    """triton.compile of one recorded launch for sm_<arch>, specialised as the runtime would
    (16-byte aligned pointers, ints equal to 1 as constants, multiples of 16 marked)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = launch.kernel
    sig, consts, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TRITON_DTYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i64" if not -2**31 <= v < 2**31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})


def tile_layouts(ttgir: str, block_r: int, block_v: int) -> list[tuple[str, str]]:
    """(op, layout) of every load and reduction of a [block_r, block_v] tile, in program order:
    the layout (with num_warps) fixes the order in which a row's sums are taken."""
    aliases = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, flags=re.M))
    shape = rf"{block_r}x{block_v}x"
    found = []
    for m in re.finditer(rf"tt\.load [^\n]*: tensor<{shape}!tt\.ptr<\w+>, (#\w+)>"
                         rf"|\}}\) : \(tensor<{shape}(\w+), (#\w+)>\) ->", ttgir):
        if m.group(1):
            found.append(("load", aliases.get(m.group(1), m.group(1))))
        else:
            found.append((f"reduce {m.group(2)}", aliases.get(m.group(3), m.group(3))))
    return found


def main(argv: list[str]) -> None:
    """Compile the score launch and the select launch that scores the rows of CASES[i] for each
    index i in argv; print {case: {"score": layouts, "select": layouts, ...}} as JSON."""
    from rho_kernels.backends import triton_select as ts

    out = {}
    for i in map(int, argv):
        n, v, dtype, layout = CASES[i]
        p = problem(n, v, dtype, layout)
        score = record(ts, setattr, ts._score_rows_impl, *p)
        select = record(ts, setattr, ts._select_rows_impl, *p[:3], case_k(n), *p[3:])
        s0 = score[0]
        sel = next(x for x in select if x.name in ("_fused_select_kernel", "_score_kernel"))
        ks, kf = compile_launch(s0), compile_launch(sel)
        out[f"{n}x{v}/{str(dtype)[6:]}/{layout}"] = {
            "score": tile_layouts(ks.asm["ttgir"], s0.constexprs["BLOCK_R"], s0.constexprs["BLOCK_V"]),
            "select": tile_layouts(kf.asm["ttgir"], sel.constexprs["BLOCK_R"], sel.constexprs["BLOCK_V"]),
            "select_kernel": sel.name,
            "num_warps": [s0.num_warps, sel.num_warps],
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
