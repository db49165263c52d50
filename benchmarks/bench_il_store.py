"""Benchmark: a per-token loss table of ~10^8 float16 values, built, saved, memory-mapped, gathered.

Phases, each in its own process so that each peak RSS (``ru_maxrss``) is its own.  ``ru_maxrss``
counts mapped file pages too: the anonymous / file-backed split at the end of each phase shows
how much is the process's own memory (the import of torch alone is ~650 MB here).

* ``build``  -- ``TokenLossStore.build`` over a synthetic corpus of ``S`` sequences of ``T``
  tokens (tokens generated from the index on the fly, so the corpus itself takes no memory) with
  a trivial reference model (an embedding table as logits, ``V`` = 16), float16 table, checkpoint
  folder, ``mmap=True``: the whole scoring pass (collate, forward, per-token CE by
  ``rk.score``, per-sequence hash, ``pwrite`` into the checkpoint's table file, checkpoints).
  The model is trivial on purpose: the figure is the machinery's throughput, a ceiling for a
  real reference model (whose forward dominates).
* ``save``   -- ``store.save(.safetensors)`` of the mapped table (streamed, sha256 on the way).
* ``gather`` -- ``TokenLossStore.load(mmap=True)`` (checksum verified by streaming reads), then
  random ``[32, T]`` batches gathered by sequence index (``gather`` -> float32): latency.

    python benchmarks/bench_il_store.py                    # S = 24415, T = 4096: 1.0e8 values
    python benchmarks/bench_il_store.py --sequences 2000 --json /tmp/x.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rho_kernels.benchmark import environment  # noqa: E402
from rho_kernels.training import TokenLossStore  # noqa: E402

V = 16


class SyntheticCorpus(torch.utils.data.Dataset):
    """Sequence i: T tokens drawn from a generator seeded by i (inputs; targets = next tokens)."""

    def __init__(self, n: int, T: int) -> None:
        self.n, self.T = n, T

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        tok = torch.randint(0, V, (self.T + 1,), generator=g)
        return i, tok[:-1], tok[1:]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_split_mb() -> dict:
    """Current resident memory split (Linux): anonymous (the process's own allocations) and
    file-backed (mapped page-cache pages: a mapped table's touched pages, shared with the page
    cache and reclaimable, plus the libraries)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key + "_mb"] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def phase_build(args) -> dict:
    torch.manual_seed(0)
    model = nn.Embedding(V, V)  # logits[b, t] = row of the input token
    ds = SyntheticCorpus(args.sequences, args.seq_len)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    store = TokenLossStore.build(model, ds, dtype=torch.float16, batch_size=args.batch, checkpoint=args.ckpt,
                                 checkpoint_every=args.checkpoint_every, mmap=True, progress=False)
    dt = time.perf_counter() - t0
    n = store.values.numel()
    return {"values": n, "table_mb": n * 2 / 2**20, "seconds": dt, "values_per_s": n / dt,
            "mb_per_s": n * 2 / 2**20 / dt, "peak_rss_mb_before": rss0, "peak_rss_mb": peak_rss_mb(),
            "rss_at_end": rss_split_mb()}


def phase_save(args) -> dict:
    torch.manual_seed(0)
    model = nn.Embedding(V, V)
    ds = SyntheticCorpus(args.sequences, args.seq_len)
    # the finished checkpoint: the build returns at once, mapped
    store = TokenLossStore.build(model, ds, dtype=torch.float16, batch_size=args.batch, checkpoint=args.ckpt,
                                 checkpoint_every=args.checkpoint_every, mmap=True, progress=False)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    store.save(args.file)
    dt = time.perf_counter() - t0
    mb = store.values.numel() * 2 / 2**20
    return {"seconds": dt, "mb_per_s": mb / dt, "peak_rss_mb_before": rss0, "peak_rss_mb": peak_rss_mb(),
            "rss_at_end": rss_split_mb(), "note": "reads the table through its mapping: the touched file pages count in RSS"}


def phase_gather(args) -> dict:
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    store = TokenLossStore.load(args.file, mmap=True)  # sha256 verified by streaming reads
    t_load = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    split_load = rss_split_mb()
    g = torch.Generator().manual_seed(0)
    times = []
    checksum = 0.0
    for _ in range(args.gathers):
        idx = torch.randint(0, store.num_sequences, (32,), generator=g)
        t = time.perf_counter()
        out = store.gather(idx)
        times.append(time.perf_counter() - t)
        checksum += float(out[0, 0])  # keep the result alive (and read it)
    assert out.shape == (32, args.seq_len) and out.dtype == torch.float32
    times_ms = sorted(x * 1e3 for x in times)
    mb = store.values.numel() * 2 / 2**20
    return {"load_verified_seconds": t_load, "verify_mb_per_s": mb / t_load, "peak_rss_mb_after_load": rss_load,
            "gathers": args.gathers, "batch": [32, args.seq_len], "first_ms": times[0] * 1e3,
            "median_ms": times_ms[len(times_ms) // 2], "p90_ms": times_ms[int(len(times_ms) * 0.9)],
            "max_ms": times_ms[-1], "peak_rss_mb_before": rss0, "peak_rss_mb": peak_rss_mb(),
            "rss_after_load": split_load, "rss_after_gathers": rss_split_mb()}


PHASES = {"build": phase_build, "save": phase_save, "gather": phase_gather}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=24415)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--gathers", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine OpenMP threads waiting "
                         "for each other make small ops 10-100x slower)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", choices=list(PHASES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.phase:  # a child: one phase, result on stdout
        print(json.dumps(PHASES[args.phase](args)))
        return {}
    folder = tempfile.mkdtemp(prefix="bench_il_store_")
    result = {"environment": environment(torch.device("cpu")), "load_average_at_start": os.getloadavg(),
              "config": {"sequences": args.sequences, "seq_len": args.seq_len, "values": args.sequences * args.seq_len,
                         "dtype": "float16", "batch": args.batch, "checkpoint_every": args.checkpoint_every,
                         "threads": args.threads}}
    try:
        base = [sys.executable, os.path.abspath(__file__), "--sequences", str(args.sequences), "--seq-len",
                str(args.seq_len), "--batch", str(args.batch), "--checkpoint-every", str(args.checkpoint_every),
                "--gathers", str(args.gathers), "--threads", str(args.threads), "--ckpt", os.path.join(folder, "ckpt"),
                "--file", os.path.join(folder, "table.safetensors")]
        for phase in PHASES:
            out = subprocess.run(base + ["--phase", phase], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-3000:]}")
            result[phase] = json.loads(out.stdout.strip().splitlines()[-1])
            print(phase, json.dumps(result[phase]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~2x the table on disk
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
