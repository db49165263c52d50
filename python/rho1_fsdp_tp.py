"""Rho-1 under FSDP2 + tensor parallelism on a 2-D mesh, the loss straight from the hidden state.

A small decoder arranged the way torchtitan arranges one: a ("dp", "tp") device mesh; inside each
block the attention and the MLP are tensor parallel (ColwiseParallel in, RowwiseParallel out);
every block, the head and the root are FSDP2 units (``fully_shard``) over "dp".  The head is
sharded over the vocabulary (``ColwiseParallel``) and never produces logits: the selective loss
takes the head module itself,

    loss = rk.selective_linear_cross_entropy(hidden, model.output, targets, reference_loss, ratio)

so FSDP2 gathers the head's tensor-parallel shard for the op (and again for the backward) and
reduce-scatters its gradient, and the op runs the vocabulary-parallel path over "tp".  The
reference loss comes from a small frozen reference model (any per-token table works as well).

    torchrun --nproc_per_node 4 python/rho1_fsdp_tp.py            # CPU: gloo, dp=2 x tp=2
    torchrun --nproc_per_node 8 python/rho1_fsdp_tp.py --tp 4     # GPUs: NCCL, one per rank
    python python/rho1_fsdp_tp.py --tp 1 --accum 2                # one process, the same steps

Each optimizer step trains on ``dp * accum`` micro-batches of the global batch (data parallel
over "dp", gradient accumulation within a rank), so the last two command lines see the same
micro-batches and print the same losses.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout's package first
import rho_kernels as rk  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(dim, 4 * dim, bias=False)
        self.w2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        # -1 heads: this rank's share of them under tensor parallelism
        q, k, v = (w(h).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.wo(a)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        """The last hidden state, what the head would turn into logits (called as model(ids), so
        that the root's FSDP hooks fire)."""
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def logits(self, ids):  # only for the (unsharded) reference model
        return self.output(self(ids))


def parallelize(model: Decoder, mesh) -> Decoder:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, dp = mesh["tp"], mesh["dp"]
    for layer in model.layers:
        parallelize_module(layer, tp, {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
                                       "wo": RowwiseParallel(), "w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                       "w2": RowwiseParallel()})
    # The head: its weight sharded over the vocabulary (the op skips ColwiseParallel's hooks).
    parallelize_module(model.output, tp, ColwiseParallel())
    for layer in model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model.output, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (the rest of the ranks: dp)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per rank and step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--ratio", type=float, default=0.6, help="Rho-1's kept fraction of tokens")
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the {world} ranks")
    from torch.distributed.device_mesh import init_device_mesh

    dp_size = world // args.tp
    mesh = init_device_mesh(device.type, (dp_size, args.tp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()

    torch.manual_seed(0)  # the same initial weights on every rank (and in one process)
    model = Decoder(args.vocab, args.dim, args.layers, args.heads, args.seq).to(device)
    reference = Decoder(args.vocab, args.dim, 1, args.heads, args.seq).to(device).eval().requires_grad_(False)
    if world > 1:
        model = parallelize(model, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    n_micro = dp_size * args.accum  # micro-batches of the global batch, per step
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        # A learnable stream: each token is the previous one plus 1, 30% of tokens random noise.
        start = torch.randint(0, args.vocab, (n_micro * args.micro_batch, 1), generator=g)
        ids = (start + torch.arange(args.seq + 1)) % args.vocab
        noise = torch.rand(ids.shape, generator=g) < 0.3
        ids = torch.where(noise, torch.randint(0, args.vocab, ids.shape, generator=g), ids).to(device)
        total = torch.zeros((), device=device)
        for m in range(dp_rank, n_micro, dp_size):  # this dp rank's micro-batches
            batch = ids[m * args.micro_batch:(m + 1) * args.micro_batch]
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with torch.no_grad():
                ref_loss = rk.score(reference.logits(inputs), targets, method="loss")
            hidden = model(inputs)
            loss = rk.selective_linear_cross_entropy(hidden, model.output, targets, ref_loss, args.ratio)
            (loss / args.accum).backward()
            total += loss.detach() / n_micro
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)  # the mean over every micro-batch of the step (each counted once per tp rank)
        total /= args.tp
        if rank == 0:
            print(f"step {step}: loss {total.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
