"""IrreducibleLossStore: build, gather, checks, persistence, fingerprint, no-holdout variant."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import rho_kernels as rk
from rho_kernels.training import IndexedDataset, IrreducibleLossStore, dataset_fingerprint, split_halves

torch.set_num_threads(1)


def _data(n=50, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _model(d=4, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Dropout(0.5), nn.Linear(8, c))


def _store(n=50, **kw):
    x, y = _data(n)
    m = _model()
    return IrreducibleLossStore.build(m, IndexedDataset(TensorDataset(x, y)), batch_size=16, progress=False, **kw), m, x, y


def test_build_matches_cross_entropy_in_eval_mode_and_restores_mode():
    store, m, x, y = _store()
    assert m.training  # restored
    m.eval()
    with torch.no_grad():
        ref = F.cross_entropy(m(x), y, reduction="none")
    assert store.losses.dtype == torch.float32 and store.losses.shape == (50,)
    torch.testing.assert_close(store.losses, ref, rtol=1e-5, atol=1e-6)
    assert store.fingerprint == dataset_fingerprint(y)


def test_build_from_shuffled_loader_stores_by_index():
    x, y = _data()
    m = _model().eval()
    ds = IndexedDataset(TensorDataset(x, y))
    loader = DataLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))
    store = IrreducibleLossStore.build(m, loader, progress=False)
    with torch.no_grad():
        ref = F.cross_entropy(m(x), y, reduction="none")
    torch.testing.assert_close(store.losses, ref, rtol=1e-5, atol=1e-6)


def test_build_under_bf16_autocast():
    x, y = _data()
    m = _model().eval()
    store = IrreducibleLossStore.build(m, IndexedDataset(TensorDataset(x, y)), progress=False,
                                       autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = F.cross_entropy(m(x), y, reduction="none")
    assert store.losses.dtype == torch.float32
    torch.testing.assert_close(store.losses, ref, rtol=0.05, atol=0.05)


def test_gather_shape_device_and_values():
    store, *_ = _store()
    idx = torch.tensor([[3, 0], [49, 3]])
    out = store.gather(idx)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    assert torch.equal(out, store.losses[idx])
    assert torch.equal(store[idx], out)


def test_bad_device_is_a_clear_error():
    """torch's own error for "gpu" lists twenty device types and not the argument."""
    store = IrreducibleLossStore(torch.rand(10))
    for bad in ("gpu", "cuda:x", 1.5):
        with pytest.raises(ValueError, match=r"device=.* is not a device: expected e\.g\. 'cpu', 'cuda'"):
            store.gather(torch.arange(3), device=bad)
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        store.to("gpu")


def test_meta_index_is_a_clear_error():
    """torch's own error is a raw NotImplementedError about copying out of a meta tensor."""
    store = IrreducibleLossStore(torch.rand(10))
    with pytest.raises(ValueError, match=r"index is on the meta device \(shape \(2, 3\), no values\)"):
        store.gather(torch.zeros(2, 3, dtype=torch.int64, device="meta"))


def test_out_of_range_index_is_a_clear_error():
    store, *_ = _store()
    with pytest.raises(ValueError, match="index 50 .*out of range"):
        store.gather(torch.tensor([1, 50]))
    with pytest.raises(ValueError, match="index -1"):
        store.gather(torch.tensor([-1]))
    # unchecked: index_select's own error, never a silent read
    with pytest.raises(IndexError):
        store.gather(torch.tensor([1, 50]), check=False)
    with pytest.raises(TypeError, match="integer"):
        store.gather(torch.tensor([1.0]))


def test_missing_examples_refused_at_build_and_gather():
    x, y = _data()
    ds = Subset(IndexedDataset(TensorDataset(x, y)), list(range(0, 50, 2)))  # odd indices unscored
    m = _model()
    with pytest.raises(ValueError, match="25 of 50 examples were never scored"):
        IrreducibleLossStore.build(m, ds, num_examples=50, progress=False)
    store = IrreducibleLossStore.build(m, ds, num_examples=50, progress=False, allow_missing=True)
    assert store.fingerprint is None  # labels of unseen examples unknown
    assert torch.equal(store.missing(), torch.arange(1, 50, 2))
    store.gather(torch.tensor([0, 2]))  # scored: fine
    with pytest.raises(ValueError, match="example 3 .*never scored"):
        store.gather(torch.tensor([0, 3]))
    # with checking off, NaN IL flows into the op, where it is ineligible (ranked last, valid=False)
    il = store.gather(torch.tensor([1, 0, 3, 2]), check=False)
    logits = torch.zeros(4, 3)
    sel = rk.select(logits, y[[1, 0, 3, 2]], il, 4, method="reducible")
    assert sel.indices[:2].sort().values.tolist() == [1, 3]
    assert sel.valid.tolist() == [True, True, False, False]


def test_validate_and_check_option():
    store, *_ = _store()
    store.validate()
    store.losses[7] = math.nan
    with pytest.raises(ValueError, match="never scored"):
        store.validate()
    store.validate(allow_missing=True)
    store.losses[7] = math.inf
    with pytest.raises(ValueError, match="infinite"):
        store.validate()
    s2 = IrreducibleLossStore(torch.tensor([0.5, math.nan]), check=False)
    assert math.isnan(float(s2.gather(torch.tensor([1]))))  # opted out
    with pytest.raises(ValueError, match="never scored"):
        s2.gather(torch.tensor([1]), check=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_save_load_roundtrip_and_fingerprint(tmp_path, suffix):
    store, _, _, y = _store()
    path = tmp_path / f"il{suffix}"
    store.save(path)
    loaded = IrreducibleLossStore.load(path, labels=y)
    assert torch.equal(loaded.losses, store.losses)
    assert loaded.fingerprint == store.fingerprint
    IrreducibleLossStore.load(path, fingerprint=store.fingerprint)
    y2 = y.clone()
    y2[4] = (y2[4] + 1) % 3
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        IrreducibleLossStore.load(path, labels=y2)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        IrreducibleLossStore.load(path, labels=y[:-1])
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        IrreducibleLossStore.load(path, fingerprint="n=50;labels_sha256=0")


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_memory_mapped_load(tmp_path, suffix):
    store, _, _, y = _store()
    path = tmp_path / f"il{suffix}"
    store.save(path)
    mm = IrreducibleLossStore.load(path, mmap=True, labels=y)
    idx = torch.tensor([5, 1, 49])
    assert torch.equal(mm.gather(idx), store.losses[idx])
    if suffix == ".npy":
        # a raw float32 array on disk: also readable with np.memmap/torch.from_file
        arr = np.load(path, mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == np.float32


def test_load_rejects_unknown_format(tmp_path):
    store, *_ = _store()
    with pytest.raises(ValueError, match="cannot infer"):
        store.save(tmp_path / "il.bin")
    with pytest.raises(ValueError, match="unknown format"):
        store.save(tmp_path / "il.npy", format="zip")


def test_safetensors_mmap_maps_the_file_without_reading_it(tmp_path):
    # the README's example: save .safetensors, load it memory-mapped
    store, _, _, y = _store()
    store.save(tmp_path / "il.safetensors")
    mm = IrreducibleLossStore.load(tmp_path / "il.safetensors", mmap=True, labels=y)
    assert torch.equal(mm.losses, store.losses)
    assert mm.losses.untyped_storage().data_ptr() != store.losses.untyped_storage().data_ptr()
    mm.losses[0] = 5.0  # copy-on-write: the file keeps its table
    assert torch.equal(IrreducibleLossStore.load(tmp_path / "il.safetensors").losses, store.losses)


def test_ignored_labels_are_never_selectable_nan_and_counted():
    x, y = _data()
    y[[0, 9, 10]] = -100
    m = _model()
    store = IrreducibleLossStore.build(m, IndexedDataset(TensorDataset(x, y)), batch_size=16, progress=False)
    assert torch.isnan(store.losses[[0, 9, 10]]).all() and not torch.isnan(store.losses[1:9]).any()
    assert store.num_ignored == 3 and store.fingerprint == dataset_fingerprint(y)
    assert store.validate() == {"num_examples": 50, "num_ignored": 3, "num_unscored": 0}
    assert store.validate(y) == {"num_examples": 50, "num_ignored": 3, "num_unscored": 0}
    store.gather(torch.tensor([0, 1]))  # checked gather: an ignored example is not an error
    il = store.gather(torch.tensor([0, 1, 2, 9]))
    sel = rk.select(torch.zeros(4, 3), y[[0, 1, 2, 9]], il, 4, method="reducible")
    assert sel.valid.tolist() == [True, True, False, False]  # the ignored rows come last, invalid
    assert sorted(sel.indices[2:].tolist()) == [0, 3]
    # another NaN that is not an ignored example is still an unscored one
    store.losses[5] = math.nan
    with pytest.raises(ValueError, match="1 of 50 examples were never scored .* besides the 3 ignored"):
        store.validate()
    with pytest.raises(ValueError, match=r"never scored .*e\.g\. indices \[5\]"):
        store.validate(y)
    assert store.validate(allow_missing=True)["num_unscored"] == 1


def test_indexed_dataset_passes_extra_fields():
    x, y = _data()
    w = torch.rand(50)
    ds = IndexedDataset(TensorDataset(x, y, w))
    i, xi, yi, wi = ds[7]
    assert i == 7 and torch.equal(xi, x[7]) and yi == y[7] and wi == w[7]
    m = _model()
    store = IrreducibleLossStore.build(m, ds, batch_size=16, progress=False)  # extras ignored
    ref = IrreducibleLossStore.build(m, IndexedDataset(TensorDataset(x, y)), batch_size=16, progress=False)
    assert torch.equal(store.losses, ref.losses)


def test_fingerprint_sensitivity():
    y = torch.tensor([0, 1, 2, 1])
    assert dataset_fingerprint(y) == dataset_fingerprint(np.array([0, 1, 2, 1]))
    assert dataset_fingerprint(y) != dataset_fingerprint(torch.tensor([0, 1, 1, 2]))
    assert dataset_fingerprint(y) != dataset_fingerprint(y[:3])
    assert dataset_fingerprint(y).startswith("n=4;")


def test_no_holdout_variant_each_half_scored_by_the_other_model():
    x, y = _data(40)
    ds = IndexedDataset(TensorDataset(x, y))
    a, b = split_halves(40, seed=1)
    assert torch.equal(torch.cat([a, b]).sort().values, torch.arange(40))
    m_a, m_b = _model(seed=1).eval(), _model(seed=2).eval()  # m_a "trained on" a, m_b on b
    store = IrreducibleLossStore.build_no_holdout((m_a, m_b), ds, (a, b), progress=False, batch_size=8)
    with torch.no_grad():
        ce_a = F.cross_entropy(m_a(x), y, reduction="none")
        ce_b = F.cross_entropy(m_b(x), y, reduction="none")
    torch.testing.assert_close(store.losses[b], ce_a[b], rtol=1e-5, atol=1e-6)  # m_a scores half b
    torch.testing.assert_close(store.losses[a], ce_b[a], rtol=1e-5, atol=1e-6)
    assert store.fingerprint == dataset_fingerprint(y)
    with pytest.raises(ValueError, match="disjoint"):
        IrreducibleLossStore.build_no_holdout((m_a, m_b), ds, (a, torch.cat([b[1:], a[:1]])), progress=False)


def test_bad_inputs():
    with pytest.raises(TypeError):
        IndexedDataset(5)
    with pytest.raises(ValueError, match=r"\(x, y, \*extra\), got a tuple of length 1"):
        IndexedDataset([(1,)])[0]
    with pytest.raises(ValueError, match="got int"):
        IndexedDataset([5])[0]
    with pytest.raises(ValueError, match="1-D"):
        IrreducibleLossStore(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="float"):
        IrreducibleLossStore(torch.zeros(2, dtype=torch.int64))
    x, y = _data()
    with pytest.raises(ValueError, match=r"\(index, x, y, \*extra\)"):
        IrreducibleLossStore.build(_model(), TensorDataset(x, y), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        IrreducibleLossStore.build(_model(), IndexedDataset(TensorDataset(x, y)), num_examples=10, progress=False)
    with pytest.raises(ValueError, match=">= 2"):
        split_halves(1)
