"""TokenLossStore: per-token reference loss, fixed-length and ragged, fp16/bf16/fp32; gathered by
sequence index and fed to select_mask / selective_cross_entropy; persisted and memory-mapped."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import rho_kernels as rk
from rho_kernels.training import IndexedDataset, IrreducibleLossStore, TokenLossStore, token_fingerprint

torch.set_num_threads(1)
V, N, T = 17, 9, 8


class LM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(V, 12), nn.Linear(12, V)
        self.drop = nn.Dropout(0.5)  # must be off during the build (eval mode)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.emb(x)).cumsum(1)))  # causal


def _corpus(seed=0):
    g = torch.Generator().manual_seed(seed)
    inp, tgt = torch.randint(0, V, (N, T), generator=g), torch.randint(0, V, (N, T), generator=g)
    tgt[3, 5:] = -100
    return inp, tgt


def _ce(model, inp, tgt):
    model.eval()
    with torch.no_grad():
        logits = model(inp)
    ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1).clamp(min=0), reduction="none").view(tgt.shape)
    return torch.where(tgt == -100, torch.full_like(ce, math.nan), ce)


class Ragged(torch.utils.data.Dataset):
    def __init__(self, inp, tgt, lengths):
        self.inp, self.tgt, self.lengths = inp, tgt, lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = int(self.lengths[i])
        return i, self.inp[i, :n], self.tgt[i, :n]


LENGTHS = torch.tensor([8, 3, 5, 8, 1, 0, 6, 2, 7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_build_gives_per_token_ce_in_the_table_dtype(dtype):
    inp, tgt = _corpus()
    m = LM()
    store = TokenLossStore.build(m, IndexedDataset(TensorDataset(inp, tgt)), dtype=dtype, batch_size=4, progress=False)
    assert m.training  # mode restored
    want = _ce(m, inp, tgt)
    assert store.values.dtype == dtype and store.values.shape == (N, T) and store.seq_len == T
    torch.testing.assert_close(store.values.float(), want.to(dtype).float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert store.validate() == {"num_tokens": N * T, "num_ignored": 3, "num_unscored": 0}
    assert store.fingerprint == token_fingerprint(tgt)
    store.check_fingerprint(tgt)
    tgt2 = tgt.clone()
    tgt2[0, 0] = (tgt2[0, 0] + 1) % V
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        store.check_fingerprint(tgt2)


def test_ragged_build_and_gather():
    inp, tgt = _corpus()
    m = LM()
    store = TokenLossStore.build(m, Ragged(inp, tgt, LENGTHS), lengths=LENGTHS, batch_size=4, progress=False,
                                 dtype=torch.float32)
    assert store.seq_len is None and store.values.shape == (int(LENGTHS.sum()),)
    assert torch.equal(store.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), LENGTHS.cumsum(0)]))
    for i, n in enumerate(LENGTHS.tolist()):
        want = _ce(m, inp[i:i + 1, :n], tgt[i:i + 1, :n])[0]
        torch.testing.assert_close(store.values[store.offsets[i]:store.offsets[i + 1]], want, equal_nan=True,
                                   rtol=1e-5, atol=1e-6)
    got = store.gather(torch.tensor([1, 0, 5]), length=4)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got[0, :3], store.values[8:11])
    assert torch.isnan(got[0, 3]) and torch.isnan(got[2]).all()  # padding and an empty sequence
    torch.testing.assert_close(got[1], store.values[:4])  # cut to length
    with pytest.raises(ValueError, match="length="):
        store.gather(torch.tensor([0]))
    assert store.fingerprint == token_fingerprint([tgt[i, :n] for i, n in enumerate(LENGTHS.tolist())])


def test_gathered_rows_feed_select_mask_and_selective_cross_entropy():
    inp, tgt = _corpus()
    ref_model, model = LM(seed=0), LM(seed=1).eval()
    store = TokenLossStore.build(ref_model, IndexedDataset(TensorDataset(inp, tgt)), batch_size=4, progress=False)
    idx = torch.tensor([3, 0, 7, 2])
    ref = store.gather(idx)
    assert ref.dtype == torch.float32 and ref.shape == (4, T)
    want_ref = _ce(ref_model, inp[idx], tgt[idx]).half().float()  # the table is float16
    torch.testing.assert_close(ref, want_ref, equal_nan=True, rtol=0, atol=0)
    logits = model(inp[idx])
    mask = rk.select_mask(logits, tgt[idx], ref, 0.5)
    assert torch.equal(mask, rk.select_mask(logits, tgt[idx], want_ref, 0.5))
    assert not mask[tgt[idx] == -100].any()
    loss = rk.selective_cross_entropy(logits, tgt[idx], ref, 0.5)
    want = F.cross_entropy(logits[mask], tgt[idx][mask])
    torch.testing.assert_close(loss, want)
    loss.backward()


def test_gather_compiles_without_graph_breaks():
    inp, tgt = _corpus()
    store = TokenLossStore.build(LM(), IndexedDataset(TensorDataset(inp, tgt)), batch_size=4, progress=False)
    ragged = TokenLossStore(store.values.reshape(-1), torch.arange(0, N * T + 1, T))
    il = IrreducibleLossStore(torch.rand(N))
    idx = torch.tensor([4, 1, 1])
    # fullgraph=True fails on any host sync or data-dependent shape; "eager" skips codegen
    f = torch.compile(lambda i: (store.gather(i), ragged.gather(i, length=T), il.gather(i)), fullgraph=True,
                      backend="eager")
    a, b, c = f(idx)
    assert torch.equal(a, store.values[idx].float()) and torch.equal(b, a) and torch.equal(c, il.losses[idx])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_save_load_and_mmap(tmp_path, suffix):
    inp, tgt = _corpus()
    m = LM()
    fixed = TokenLossStore.build(m, IndexedDataset(TensorDataset(inp, tgt)), dtype=torch.bfloat16, batch_size=4,
                                 progress=False)
    ragged = TokenLossStore.build(m, Ragged(inp, tgt, LENGTHS), lengths=LENGTHS, batch_size=4, progress=False)
    for store, name in ((fixed, "fixed"), (ragged, "ragged")):
        path = tmp_path / f"{name}{suffix}"
        if name == "ragged" and suffix == ".npy":
            with pytest.raises(ValueError, match="ragged"):
                store.save(path)
            continue
        store.save(path)
        for mmap in (False, True):
            back = TokenLossStore.load(path, mmap=mmap, fingerprint=store.fingerprint)
            assert back.values.dtype == store.values.dtype
            assert torch.equal(back.values.view(torch.int16), store.values.view(torch.int16))
            assert (back.offsets is None) == (store.offsets is None)
            assert back.num_ignored == store.num_ignored
        with pytest.raises(ValueError, match="TokenLossStore.load"):
            IrreducibleLossStore.load(path)
    IrreducibleLossStore(torch.rand(4)).save(tmp_path / f"il{suffix}")
    with pytest.raises(ValueError, match="IrreducibleLossStore.load"):
        TokenLossStore.load(tmp_path / f"il{suffix}")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        TokenLossStore.load(tmp_path / f"fixed{suffix}", sequences=tgt[:-1])


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        TokenLossStore(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        TokenLossStore(torch.zeros(6))
    with pytest.raises(ValueError, match="rise from 0"):
        TokenLossStore(torch.zeros(6), torch.tensor([0, 4, 3, 6]))
    store = TokenLossStore(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="1-D integer"):
        store.gather(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="seq_len"):
        store.gather(torch.tensor([0]), length=4)
    inp, tgt = _corpus()
    with pytest.raises(ValueError, match="1-D"):
        TokenLossStore.build(nn.Embedding(V, V), IndexedDataset(TensorDataset(inp[:, 0], tgt[:, 0])), progress=False)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        TokenLossStore.build(LM(), IndexedDataset(TensorDataset(inp, tgt)), forward=lambda m, x: m(x).mean(1),
                             progress=False)
    with pytest.raises(ValueError, match="lengths must hold"):
        TokenLossStore.build(LM(), Ragged(inp, tgt, LENGTHS), lengths=LENGTHS[:-1], progress=False)


def test_bad_device_is_a_clear_error():
    store = TokenLossStore(torch.rand(4, 3))
    with pytest.raises(ValueError, match="device='gpu' is not a device: expected e.g. 'cpu', 'cuda'"):
        store.gather(torch.arange(2), device="gpu")
    with pytest.raises(ValueError, match=r"index is on the meta device \(shape \(2,\), no values\)"):
        store.gather(torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        store.to("gpu")
