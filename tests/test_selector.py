"""OnlineBatchSelector: methods, sampling, model mode, AMP, invalid picks, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rho_kernels as rk
from rho_kernels.training import (
    IrreducibleLossStore,
    TokenLossStore,
    OnlineBatchSelector,
    SELECTOR_METHODS,
    constant_temperature,
    cosine_temperature,
    exponential_temperature,
    linear_temperature,
)

torch.set_num_threads(1)
N, D, C = 64, 6, 5


def _batch(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.arange(n), torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


def _store(n=N, seed=5):
    g = torch.Generator().manual_seed(seed)
    return IrreducibleLossStore(torch.rand(n, generator=g) * 2)


def _expected_topk(score, k):
    # distinct float scores here, so a plain sort defines the expected order
    return torch.sort(score, descending=True, stable=True).indices[:k]


def test_reducible_picks_top_k_of_ce_minus_il_best_first():
    idx, x, y = _batch()
    model, store = _model(), _store()
    sel = OnlineBatchSelector(model, store, "reducible", ratio=0.25, score_mode="eval")
    out_idx, out_x, out_y = sel.select((idx, x, y))
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y, reduction="none")
    want = _expected_topk(ce - store.losses, 16)
    assert torch.equal(out_idx, want)
    assert torch.equal(out_x, x[want]) and torch.equal(out_y, y[want])
    assert torch.equal(sel.last.positions, want)
    torch.testing.assert_close(sel.last.scores, (ce - store.losses)[want], rtol=1e-5, atol=1e-5)
    assert sel.last.valid.all()


@pytest.mark.parametrize("method", [m for m in rk.METHODS if m != "reducible"])
def test_every_op_method_matches_rk_select(method):
    idx, x, y = _batch(1)
    model, store = _model(1), _store()
    sel = OnlineBatchSelector(model, store, method, k=10, score_mode="eval")
    got = sel.select((idx, x, y))[0]
    with torch.no_grad():
        logits = model(x)
    want = rk.select(logits, y, store.losses, 10, method=method).indices
    assert torch.equal(got, want)


def test_il_model_source_equals_store_source():
    idx, x, y = _batch(2)
    model, il_model = _model(2), _model(3)
    store = IrreducibleLossStore(F.cross_entropy(il_model(x), y, reduction="none").detach())
    a = OnlineBatchSelector(model, store, k=8, score_mode="eval").select((idx, x, y))[0]
    b = OnlineBatchSelector(model, il_model, k=8, score_mode="eval").select((x, y))[0]
    assert torch.equal(x[a], b)


def test_ratio_gives_paper_sizes_and_structured_batches():
    n = 320
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(n, D, generator=g), "b": [torch.randn(n, 2, generator=g)]}
    y = torch.randint(0, C, (n,), generator=g)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D + 2, C)

        def forward(self, inp):
            return self.lin(torch.cat([inp["a"], inp["b"][0]], 1))

    sel = OnlineBatchSelector(M(), None, "loss", ratio=0.1)
    xi, yi = sel.select((x, y))
    assert sel.num_picks(320) == 32
    assert xi["a"].shape == (32, D) and xi["b"][0].shape == (32, 2) and yi.shape == (32,)
    assert torch.equal(xi["a"], x["a"][sel.last.positions])


def test_uniform_is_without_replacement_reproducible_and_skips_the_forward():
    calls = []
    model = _model()
    model.register_forward_hook(lambda *a: calls.append(1))
    idx, x, y = _batch()
    picks = []
    for _ in range(2):
        sel = OnlineBatchSelector(model, None, "uniform", k=40, generator=torch.Generator().manual_seed(9))
        picks.append(sel.select((idx, x, y))[0])
    assert torch.equal(picks[0], picks[1])
    assert picks[0].unique().numel() == 40
    assert calls == []
    sel = OnlineBatchSelector(model, None, "uniform", k=4, score_uniform=True)
    sel.select((idx, x, y))
    assert len(calls) == 1 and not math.isnan(sel.stats.summary()["mean_score_picked"])


def _fixed_score_selector(il_values, k, temperature, seed=0):
    # method "irreducible" scores -IL without a model forward: exact, controllable scores
    store = IrreducibleLossStore(torch.tensor(il_values, dtype=torch.float32))
    return OnlineBatchSelector(_model(), store, "irreducible", k=k, temperature=temperature,
                               generator=torch.Generator().manual_seed(seed))


def test_boltzmann_first_pick_follows_softmax_of_score_over_t():
    n = len(il := [0.0, -math.log(2.0), -math.log(4.0)])  # scores 0, log2, log4
    idx, x, y = torch.arange(n), torch.zeros(n, D), torch.zeros(n, dtype=torch.int64)
    sel = _fixed_score_selector(il, 1, 1.0)
    counts = torch.zeros(n)
    trials = 2000
    for _ in range(trials):
        counts[sel.select((idx, x, y))[0]] += 1
    freq = counts / trials
    expected = torch.tensor([1.0, 2.0, 4.0]) / 7
    assert (freq - expected).abs().max() < 0.045, freq  # ~4 standard deviations (sd <= 0.011)


def test_boltzmann_without_replacement_and_temperature_limits():
    n = 50
    il = torch.linspace(0, 5, n).tolist()  # score = -il: row 0 best
    idx, x, y = torch.arange(n), torch.zeros(n, D), torch.zeros(n, dtype=torch.int64)
    sel = _fixed_score_selector(il, 20, 1.0)
    for _ in range(20):
        assert sel.select((idx, x, y))[0].unique().numel() == 20
    cold = _fixed_score_selector(il, 10, 1e-6).select((idx, x, y))[0]
    assert torch.equal(cold, torch.arange(10))
    hot = _fixed_score_selector(il, 10, 1e6).select((idx, x, y))[0]
    assert not torch.equal(hot.sort().values, torch.arange(10))


def test_temperature_schedules():
    assert constant_temperature(2.0)(1000) == 2.0
    lin = linear_temperature(1.0, 0.1, 10)
    assert lin(0) == 1.0 and abs(lin(5) - 0.55) < 1e-12 and abs(lin(10) - 0.1) < 1e-12 and lin(99) == lin(10)
    ex = exponential_temperature(1.0, 0.01, 4)
    assert abs(ex(2) - 0.1) < 1e-12 and abs(ex(10) - 0.01) < 1e-12
    co = cosine_temperature(1.0, 0.0 + 0.5, 10)
    assert co(0) == 1.0 and abs(co(5) - 0.75) < 1e-12 and abs(co(10) - 0.5) < 1e-12
    with pytest.raises(ValueError):
        linear_temperature(0.0, 1.0, 10)
    with pytest.raises(ValueError):
        exponential_temperature(1.0, 0.1, 0)
    # the selector follows the schedule step by step
    sel = _fixed_score_selector([0.0, 1.0], 1, linear_temperature(1.0, 0.5, 2))
    temps = []
    for _ in range(3):
        temps.append(sel.current_temperature())
        sel.select((torch.arange(2), torch.zeros(2, D), torch.zeros(2, dtype=torch.int64)))
    assert temps == [1.0, 0.75, 0.5]


def _bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Dropout(0.0), nn.Linear(8, C))
    with torch.no_grad():  # non-trivial running statistics, as after some training
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(7)
    return model


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_scoring_leaves_no_trace_on_the_model_by_default():
    """Train-mode scoring (the paper's: BatchNorm on the candidate batch's statistics) with the
    model's buffers, num_batches_tracked included, put back; the mode is restored."""
    idx, x, y = _batch()
    for start_in_train in (False, True):
        model = _bn_model()
        model.train(start_in_train)
        before = _buffers(model)
        sel = OnlineBatchSelector(model, None, "loss", k=4)  # score_mode="train" (default)
        got = sel.select((x, y))[0]
        after = _buffers(model)
        assert all(torch.equal(before[k], after[k]) for k in before), "scoring changed the model's buffers"
        assert model.training == start_in_train
        assert all(p.grad is None for p in model.parameters())  # scored under no_grad
        # the scores are still the train-mode ones (batch statistics), not eval-mode ones
        twin = _bn_model()
        twin.train()
        with torch.no_grad():
            want = rk.select(twin(x), y, k=4, method="loss").indices
        assert torch.equal(got, x[want])
        twin.eval()
        with torch.no_grad():
            eval_pick = rk.select(twin(x), y, k=4, method="loss").indices
        assert not torch.equal(want, eval_pick)  # the two modes differ here, so the check means something


def test_lazy_batchnorm_first_scored_is_left_fresh():
    idx, x, y = _batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.LazyBatchNorm1d(), nn.Linear(8, C))
    OnlineBatchSelector(model, None, "loss", k=4).select((x, y))
    bn = model[1]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.running_var, torch.ones(8))
    assert int(bn.num_batches_tracked) == 0


def test_paper_side_effect_on_request_and_eval_mode_untouched():
    idx, x, y = _batch()
    model = _bn_model()
    model.eval()
    before = _buffers(model)
    OnlineBatchSelector(model, None, "loss", k=4, score_mode="train", restore_buffers=False).select((x, y))
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert int(model[1].num_batches_tracked) == 8
    assert not model.training  # mode restored
    model = _bn_model()
    before = _buffers(model)
    OnlineBatchSelector(model, None, "loss", k=4, score_mode="eval", restore_buffers=False).select((x, y))
    assert all(torch.equal(before[k], v) for k, v in _buffers(model).items())
    assert model.training


def test_bf16_autocast_on_cpu():
    idx, x, y = _batch(3, n=200)
    model, store = _model(3), _store(200)
    dtypes = []
    model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    sel = OnlineBatchSelector(model, store, k=20, autocast_dtype=torch.bfloat16, score_mode="eval")
    got = sel.select((idx, x, y))[0]
    assert dtypes == [torch.bfloat16]
    ref = OnlineBatchSelector(model, store, k=20, score_mode="eval").select((idx, x, y))[0]
    overlap = len(set(got.tolist()) & set(ref.tolist()))
    assert overlap >= 15, overlap  # bf16 logits move a few near-ties only
    # ambient autocast (the caller's context) works too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sub = OnlineBatchSelector(model, store, k=20, score_mode="eval").select((idx, x, y))
    assert sub[0].shape == (20,)


def test_nan_il_is_never_picked_before_scored_rows_and_invalid_policies():
    idx, x, y = _batch(4, n=10)
    losses = torch.full((10,), math.nan)
    losses[[2, 5, 7]] = torch.tensor([0.1, 0.2, 0.3])
    store = IrreducibleLossStore(losses, check=False)
    model = _model(4)
    with pytest.raises(ValueError, match="not eligible"):
        OnlineBatchSelector(model, store, k=5).select((idx, x, y))
    kept = OnlineBatchSelector(model, store, k=5, invalid="keep")
    got = kept.select((idx, x, y))[0]
    assert sorted(got[:3].tolist()) == [2, 5, 7] and kept.last.valid.tolist() == [True] * 3 + [False] * 2
    assert kept.stats.summary()["invalid_picks"] == 2
    dropped = OnlineBatchSelector(model, store, k=5, invalid="drop")
    got = dropped.select((idx, x, y))[0]
    assert sorted(got.tolist()) == [2, 5, 7] and dropped.last.valid.all()
    # enough scored rows: NaN rows are simply not picked
    ok = OnlineBatchSelector(model, store, k=3).select((idx, x, y))[0]
    assert sorted(ok.tolist()) == [2, 5, 7]
    # with the store's default check (CPU), the NaN lookup is an error up front
    with pytest.raises(ValueError, match="never scored"):
        OnlineBatchSelector(model, IrreducibleLossStore(losses), k=3).select((idx, x, y))


def test_too_few_eligible_rows_error_names_the_real_cause():
    idx, x, y = _batch(5, n=12)
    y = y.clone()
    y[:9] = -100
    with pytest.raises(ValueError) as info:
        OnlineBatchSelector(_model(), None, "loss", k=6).select((x, y))
    msg = str(info.value)
    assert "3 with an ignored target" in msg and "ignore_index=-100" in msg and "IL store" not in msg
    losses = torch.rand(12)
    losses[:9] = math.nan
    store = IrreducibleLossStore(losses, check=False)
    with pytest.raises(ValueError) as info:
        OnlineBatchSelector(_model(), store, k=6).select((idx, x, _batch(5, n=12)[2]))
    msg = str(info.value)
    assert "3 with a NaN score" in msg and "IL store" in msg and "ignored target" not in msg


def test_ignored_targets_are_not_picked():
    idx, x, y = _batch(5, n=12)
    y = y.clone()
    y[:6] = -100
    got = OnlineBatchSelector(_model(), None, "loss", k=6).select((x, y))[1]
    assert (got != -100).all()


def test_statistics_noisy_fraction_and_score_means():
    model = _model(6)
    store = _store(N)
    sel = OnlineBatchSelector(model, store, k=8, score_mode="eval")
    tot_noisy_picked = 0
    picked_scores, other_scores = [], []
    for s in range(3):
        idx, x, y = _batch(10 + s)
        noisy = torch.rand(N, generator=torch.Generator().manual_seed(s)) < 0.3
        scores = sel.score((idx, x, y))
        sel.select((idx, x, y), noisy=noisy)
        pos = sel.last.positions
        tot_noisy_picked += int(noisy[pos].sum())
        mask = torch.zeros(N, dtype=torch.bool)
        mask[pos] = True
        picked_scores.append(scores[mask])
        other_scores.append(scores[~mask])
    s = sel.stats.summary()
    assert s["steps"] == 3 and s["picks"] == 24
    assert s["noisy_pick_fraction"] == pytest.approx(tot_noisy_picked / 24)
    assert s["mean_score_picked"] == pytest.approx(float(torch.cat(picked_scores).double().mean()), rel=1e-5)
    assert s["mean_score_not_picked"] == pytest.approx(float(torch.cat(other_scores).double().mean()), rel=1e-5)
    assert s["mean_score_picked"] > s["mean_score_not_picked"]
    sel.stats.reset()
    assert math.isnan(sel.stats.summary()["mean_score_picked"])


def test_statistics_without_a_noisy_mask_leave_the_noisy_fractions_out():
    """No noisy= mask: no noisy fraction (not a NaN that reads as "unknown"); a mask brings them back."""
    sel = OnlineBatchSelector(_model(6), _store(N), k=8, score_mode="eval")
    idx, x, y = _batch(3)
    sel.select((idx, x, y))
    s = sel.stats.summary()
    assert "noisy_pick_fraction" not in s and "noisy_candidate_fraction" not in s, s
    assert s["picks"] == 8 and not math.isnan(s["mean_score_picked"])
    sel.select((idx, x, y), noisy=torch.zeros(N, dtype=torch.bool))
    assert sel.stats.summary()["noisy_pick_fraction"] == 0.0

def test_bad_arguments():
    model = _model()
    assert set(SELECTOR_METHODS) == set(rk.METHODS) | {"uniform"}
    with pytest.raises(ValueError, match="unknown method"):
        OnlineBatchSelector(model, None, "random")
    with pytest.raises(ValueError, match="needs an irreducible"):
        OnlineBatchSelector(model, None, "reducible")
    with pytest.raises(ValueError, match="ratio"):
        OnlineBatchSelector(model, None, "loss", ratio=1.5)
    with pytest.raises(ValueError, match="temperature"):
        OnlineBatchSelector(model, None, "uniform", temperature=1.0)
    with pytest.raises(ValueError, match="score_mode"):
        OnlineBatchSelector(model, None, "loss", score_mode="inference")
    with pytest.raises(ValueError, match="invalid"):
        OnlineBatchSelector(model, None, "loss", invalid="ignore")
    with pytest.raises(ValueError, match="unequal"):
        OnlineBatchSelector(model, None, "loss", invalid="drop", distributed="global")
    with pytest.raises(TypeError, match="irreducible"):
        OnlineBatchSelector(model, torch.zeros(3), "loss")
    sel = OnlineBatchSelector(model, _store(), k=4)
    with pytest.raises(ValueError, match="index"):
        sel.select(_batch()[1:])  # (x, y): a store needs dataset indices
    with pytest.raises(ValueError, match="tuple"):
        sel.select(_batch()[1])
    with pytest.raises(ValueError, match="larger than"):
        OnlineBatchSelector(model, None, "loss", k=100).select(_batch()[1:])
    with pytest.raises(ValueError, match="noisy"):
        OnlineBatchSelector(model, None, "loss", k=4).select(_batch()[1:], noisy=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        _fixed_score_selector([0.0], 1, lambda s: -1.0).select((torch.arange(1), torch.zeros(1, D), torch.zeros(1, dtype=torch.int64)))


def test_hot_path_traces_without_graph_breaks():
    # fullgraph=True fails on any .item()/bool(tensor)/data-dependent branch: the per-step
    # path (store gather without checking, scoring, top-k, statistics) has no host sync.
    # backend="reference": the op layer's "auto" backend resolution is not traceable by itself.
    store = IrreducibleLossStore(torch.rand(N), check=False)
    model = _model()
    sel = OnlineBatchSelector(model, store, k=8, invalid="keep", score_mode="current", backend="reference")
    compiled = torch.compile(sel.select, fullgraph=True, backend="eager")
    idx, x, y = _batch()
    got = compiled((idx, x, y))
    want = OnlineBatchSelector(model, store, k=8, invalid="keep", score_mode="current").select((idx, x, y))
    assert torch.equal(got[0], want[0])
    assert sel.stats.summary()["picks"] == 8
    boltz = OnlineBatchSelector(model, store, k=8, invalid="keep", score_mode="current", backend="reference",
                                temperature=0.5, generator=None)
    assert torch.compile(boltz.select, fullgraph=True, backend="eager")((idx, x, y))[0].unique().numel() == 8


# ---------------------------------------------------------------------------- batch structure
def _fields_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, inp):
            return self.lin(inp["feat"] if isinstance(inp, dict) else inp[0])

    torch.manual_seed(0)
    return M()


def test_every_tensor_field_needs_the_candidate_count():
    g = torch.Generator().manual_seed(0)
    feat, y = torch.randn(40, D, generator=g), torch.randint(0, C, (40,), generator=g)
    sel = OnlineBatchSelector(_fields_model(), None, "loss", k=4)
    for extra in (torch.randn(50, 3, generator=g), torch.randn(30, 3, generator=g), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"batch field x\[1\] has shape .*candidate count 40"):
            sel.select(((feat, extra), y))
    with pytest.raises(ValueError, match=r"batch field x\['mask'\]"):
        sel.select(({"feat": feat, "mask": torch.ones(39, dtype=torch.bool)}, y))
    with pytest.raises(ValueError, match="batch field index"):
        sel.select((torch.arange(41), feat, y))
    assert sel.step == 0  # refused before anything was scored or counted


def test_per_example_lists_are_picked_other_values_pass_through():
    g = torch.Generator().manual_seed(1)
    n = 40
    feat, y = torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)
    names = [f"img_{i}.png" for i in range(n)]
    x = {"feat": feat, "path": names, "ids": tuple(range(100, 100 + n)), "split": "train",
         "classes": ["cat", "dog", "eel"], "scale": 0.5, "none": None}
    sel = OnlineBatchSelector(_fields_model(), None, "loss", k=6)
    xs, ys = sel.select((x, y))
    pos = sel.last.positions.tolist()
    assert xs["path"] == [names[i] for i in pos] and isinstance(xs["path"], list)
    assert xs["ids"] == tuple(100 + i for i in pos)
    assert xs["split"] == "train" and xs["classes"] == ["cat", "dog", "eel"] and xs["scale"] == 0.5
    assert xs["none"] is None
    assert torch.equal(xs["feat"], feat[sel.last.positions]) and torch.equal(ys, y[sel.last.positions])
    # a DataLoader's default collate gives exactly this for string fields
    from torch.utils.data import DataLoader
    data = [(feat[i], names[i], int(y[i])) for i in range(n)]
    feat_b, names_b, y_b = next(iter(DataLoader(data, batch_size=n)))
    sub = OnlineBatchSelector(_fields_model(), None, "loss", k=6).select(((feat_b, names_b), y_b))
    assert list(sub[0][1]) == [names[i] for i in pos] and type(sub[0][1]) is type(names_b)


def test_ratio_rounding_is_one_rule_everywhere():
    """n_b = ratio * n to the nearest integer, halves up, at least 1: the selector, select_mask and
    selective_cross_entropy agree (0.1 of 35 -> 4, 0.5 of 5 -> 3, 0.29 of 100 -> 29)."""
    model = _model()
    for ratio, n, want in ((0.1, 35, 4), (0.5, 5, 3), (0.29, 100, 29), (0.001, 10, 1), (1.0, 7, 7)):
        idx, x, y = _batch(7, n=n)
        sel = OnlineBatchSelector(model, None, "loss", ratio=ratio)
        assert sel.num_picks(n) == want and sel.select((x, y))[0].shape[0] == want, (ratio, n)
        logits = torch.randn(1, n, C, generator=torch.Generator().manual_seed(n))
        targets = torch.randint(0, C, (1, n), generator=torch.Generator().manual_seed(n + 1))
        ref = torch.zeros(1, n)
        assert int(rk.select_mask(logits, targets, ref, ratio).sum()) == want, (ratio, n)
        per_token = rk.selective_cross_entropy(logits, targets, ref, ratio, reduction="none")
        assert int((per_token != 0).sum()) == want, (ratio, n)


# ---------------------------------------------------------------------------- resume, repr
def _resume_run(steps, split=None, method="reducible", temperature=linear_temperature(2.0, 0.1, 5), seed=3):
    """Picks of ``steps`` selections; with ``split``, the selector is saved after ``split`` steps
    and a fresh one (fresh generator, wrong seed) resumes from the saved state."""
    import io

    model, store = _model(8), _store(N)

    def make(gen_seed):
        return OnlineBatchSelector(model, store, method, k=8, temperature=temperature, score_mode="eval",
                                   generator=torch.Generator().manual_seed(gen_seed))

    sel = make(seed)
    picks = []
    for step in range(steps):
        if step == split:
            buf = io.BytesIO()
            torch.save(sel.state_dict(), buf)
            buf.seek(0)
            sel = make(seed + 100)
            sel.load_state_dict(torch.load(buf, weights_only=True))
        idx, x, y = _batch(20 + step)
        picks.append(sel.select((idx, x, y))[0])
    return picks, sel


TIMES = {"scoring_seconds", "selection_seconds", "train_seconds", "scoring_time_fraction", "step_overhead"}


def test_state_dict_round_trip_picks_the_same_rows():
    for method, temperature in (("reducible", linear_temperature(2.0, 0.1, 5)), ("uniform", None)):
        want, ref = _resume_run(7, method=method, temperature=temperature)
        got, resumed = _resume_run(7, split=3, method=method, temperature=temperature)
        for a, b in zip(got, want):
            assert torch.equal(a, b), method
        assert resumed.step == ref.step == 7
        if temperature is not None:
            assert resumed.current_temperature() == ref.current_temperature()
        s_got, s_want = resumed.stats.summary(), ref.stats.summary()
        assert s_got.keys() == s_want.keys()
        for k in s_want.keys() - TIMES:  # the clocks differ between runs; their totals carry over
            assert s_got[k] == pytest.approx(s_want[k], nan_ok=True), k
        assert s_got["selection_seconds"] > 0
    # without the state, the resumed run restarts its schedule: different picks (the test can fail)
    restarted = _resume_run(7, method="reducible")[0][:4]
    assert not all(torch.equal(a, b) for a, b in zip(restarted, want[3:]))


def test_load_state_dict_refuses_mismatches():
    sel = OnlineBatchSelector(_model(), _store(), k=4, generator=torch.Generator())
    state = sel.state_dict()
    with pytest.raises(ValueError, match="method"):
        OnlineBatchSelector(_model(), None, "loss", k=4, generator=torch.Generator()).load_state_dict(state)
    with pytest.raises(ValueError, match="generator"):
        OnlineBatchSelector(_model(), _store(), k=4).load_state_dict(state)
    with pytest.raises(ValueError, match="state dict"):
        sel.load_state_dict({"step": 3})


def test_repr_says_what_the_selector_does():
    sel = OnlineBatchSelector(_model(), _store(), "reducible", ratio=0.1, temperature=constant_temperature(0.5))
    r = repr(sel)
    for needle in ("OnlineBatchSelector(", "method='reducible'", "ratio=0.1", "IrreducibleLossStore(64 examples)",
                   "constant 0.5", "score_mode='train'", "restore_buffers=True", "step=0"):
        assert needle in r, (needle, r)
    assert "k=8" in repr(OnlineBatchSelector(_model(), None, "loss", k=8))


# ---------------------------------------------------------------------------- language models
# Sequence candidates scored from hidden states and the LM head (no [n_B * T, V] logits).
B_LM, T_LM, D_LM, V_LM = 12, 6, 8, 37


class _TinyLM(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V_LM, D_LM)
        self.body = nn.Sequential(nn.Linear(D_LM, D_LM), nn.Tanh())
        self.lm_head = nn.Linear(D_LM, V_LM)

    def hidden(self, x):
        return self.body(self.embed(x))

    def forward(self, x):
        return self.lm_head(self.hidden(x))


def _lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V_LM, (B_LM, T_LM), generator=g)
    y = torch.randint(0, V_LM, (B_LM, T_LM), generator=g)
    y[1, 3:] = -100  # padding
    y[4] = -100      # a sequence without a counted token: never picked before the others
    return torch.arange(B_LM), x, y


def _token_store(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(y.shape, generator=g) * 3
    return TokenLossStore(torch.where(y == -100, math.nan, ref))


class _HeadSpy:
    """Records the row count of every F.linear call with the LM head's weight."""

    def __init__(self, monkeypatch, head_weight):
        self.rows, self.dtypes = [], []
        real = F.linear

        def spy(inp, weight, bias=None):
            out = real(inp, weight, bias)
            if weight.shape == head_weight.shape:
                self.rows.append(out.reshape(-1, out.shape[-1]).shape[0])
                self.dtypes.append(weight.dtype)
            return out

        monkeypatch.setattr(torch.nn.functional, "linear", spy)


def _lm_selector(model, il, **kw):
    return OnlineBatchSelector(model, il, head=lambda m: m.lm_head, forward=lambda m, x: m.hidden(x),
                               score_mode="eval", **kw)


@pytest.mark.parametrize("k", [3, B_LM])
def test_lm_head_selection_equals_select_sequences_on_materialised_logits(k, monkeypatch):
    idx, x, y = _lm_batch()
    model = _TinyLM(0)
    store = _token_store(y)
    with torch.no_grad():
        want = rk.select_sequences(model(x), y, store.values, k)
    sel = _lm_selector(model, store, k=k, chunk_size=5, invalid="keep")
    spy = _HeadSpy(monkeypatch, model.lm_head.weight)
    got_idx, got_x, got_y = sel.select((idx, x, y))
    assert torch.equal(got_idx, want.indices)
    assert torch.equal(got_x, x[want.indices]) and torch.equal(got_y, y[want.indices])
    torch.testing.assert_close(sel.last.scores, want.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(sel.last.valid, want.valid)
    # The head saw blocks of at most chunk_size tokens, covering every token once.
    assert max(spy.rows) <= 5 and sum(spy.rows) == B_LM * T_LM, spy.rows
    if k == B_LM:
        assert not sel.last.valid[-1] and sel.last.positions[-1] == 4


def test_lm_head_default_chunk_follows_the_memory_budget(monkeypatch):
    import rho_kernels.linear as rk_linear

    idx, x, y = _lm_batch(1)
    model = _TinyLM(1)
    store = _token_store(y, 2)
    want = _lm_selector(model, store, k=4).select((idx, x, y))[0]
    # A budget of 4 logits rows (float32): the op must cut the B*T tokens into blocks of 4.
    monkeypatch.setitem(rk_linear.CHUNK_BUDGET_BYTES, "cpu", 4 * V_LM * 4)
    # Full-width blocks (the cpu backend's [4096, width] tiles, which F.linear does not see,
    # are for budgets too small for tall full rows; test_linear covers them).
    monkeypatch.setattr(rk_linear, "_TILE_ROWS", 4)
    spy = _HeadSpy(monkeypatch, model.lm_head.weight)
    got = _lm_selector(model, store, k=4).select((idx, x, y))[0]
    assert torch.equal(got, want)
    assert max(spy.rows) == 4 and sum(spy.rows) == B_LM * T_LM, spy.rows


def test_lm_sequence_scores_are_mean_token_reducible_loss_from_every_il_source():
    idx, x, y = _lm_batch(2)
    model, il_model = _TinyLM(2), _TinyLM(3)
    counted = y != -100
    with torch.no_grad():
        ce = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
        il_tok = F.cross_entropy(il_model(x).transpose(1, 2), y, reduction="none")

    def mean(t):
        return torch.where(counted, t, 0).sum(1) / counted.sum(1)

    # The IL model through its own head, per token (hidden states + head for it too).
    by_model = _lm_selector(model, il_model).score((idx, x, y))
    torch.testing.assert_close(by_model, mean(ce - il_tok), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(by_model[4])  # no counted token
    # A per-token store holding the same losses gives the same scores.
    tok_store = TokenLossStore(torch.where(counted, il_tok, math.nan))
    torch.testing.assert_close(_lm_selector(model, tok_store).score((idx, x, y)), by_model, equal_nan=True)
    # A per-sequence store: one IL per sequence, for each of its tokens -> mean CE - IL.
    seq_store = IrreducibleLossStore(torch.nan_to_num(mean(il_tok)))
    want = mean(ce) - seq_store.losses
    torch.testing.assert_close(_lm_selector(model, seq_store).score((idx, x, y)), want, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    # Without head=, the same sequence rule on materialised [n_B, T, V] logits.
    plain = OnlineBatchSelector(model, seq_store, score_mode="eval").score((idx, x, y))
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    # Other methods: the op's token score, averaged per sequence.
    ent = _lm_selector(model, None, method="entropy").score((idx, x, y))
    with torch.no_grad():
        want_ent = rk.select_sequences(model(x), y, k=B_LM, method="entropy")
    torch.testing.assert_close(ent[want_ent.indices], want_ent.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    irr = _lm_selector(model, tok_store, method="irreducible").score((idx, x, y))
    torch.testing.assert_close(irr, mean(-il_tok), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_lm_head_tied_weight_bf16_autocast_and_classification_rows(monkeypatch):
    idx, x, y = _lm_batch(3)
    model = _TinyLM(3)
    store = _token_store(y, 4)
    # A [V, D] weight tensor as the head (tied embeddings have no bias).
    tied = OnlineBatchSelector(model, store, k=4, head=lambda m: m.lm_head.weight,
                               forward=lambda m, x: m.hidden(x), score_mode="eval").score((idx, x, y))
    with torch.no_grad():
        logits = F.linear(model.hidden(x), model.lm_head.weight)
    want = rk.select_sequences(logits, y, store.values, B_LM)
    torch.testing.assert_close(tied[want.indices], want.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    # Under bf16 autocast the hidden states are bf16: the head is cast to them, as autocast does.
    spy = _HeadSpy(monkeypatch, model.lm_head.weight)
    amp = _lm_selector(model, store, k=4, autocast_dtype=torch.bfloat16).select((idx, x, y))[0]
    assert amp.shape == (4,) and set(spy.dtypes) == {torch.bfloat16}
    assert model.lm_head.weight.dtype == torch.float32  # the model is untouched
    # Rows (targets [n_B]): hidden [n_B, D] and the head give select's ranking of the logits.
    bidx, bx, by = _batch(5)
    clf = _model(5)
    sel = OnlineBatchSelector(clf, _store(), k=10, head=lambda m: m[2], forward=lambda m, x: m[1](m[0](x)),
                              score_mode="eval")
    with torch.no_grad():
        want_rows = rk.select(clf(bx), by, _store().losses, 10).indices
    assert torch.equal(sel.select((bidx, bx, by))[0], want_rows)


def test_lm_head_bad_arguments():
    idx, x, y = _lm_batch()
    model = _TinyLM(0)
    with pytest.raises(TypeError, match="head must be a function"):
        OnlineBatchSelector(model, None, "loss", head=model.lm_head.weight)
    with pytest.raises(ValueError, match="chunk_size"):
        OnlineBatchSelector(model, None, "loss", head=lambda m: m.lm_head, chunk_size=0)
    with pytest.raises(TypeError, match=r"head\(model\) must return"):
        OnlineBatchSelector(model, None, "loss", head=lambda m: m.body, forward=lambda m, x: m.hidden(x)).select((x, y))
    with pytest.raises(ValueError, match="TokenLossStore holds per-token"):
        OnlineBatchSelector(_model(), TokenLossStore(torch.rand(N, 3)), k=4).select(_batch())
    with pytest.raises(ValueError, match=r"\[n_B, T\]"):
        OnlineBatchSelector(model, None, "loss", k=2).select((x, y[:, :, None]))
    with pytest.raises(ValueError, match="does not match the leading dims"):  # hidden [n_B, D] for [n_B, T] targets
        OnlineBatchSelector(model, None, "loss", k=2, head=lambda m: m.lm_head,
                            forward=lambda m, x: m.hidden(x)[:, 0]).select((x, y))
    r = repr(_lm_selector(model, _token_store(y), k=2, chunk_size=7))
    assert "TokenLossStore(12 sequences)" in r and "chunk_size=7" in r


def test_lm_head_hot_path_traces_without_graph_breaks():
    # Fresh dynamo state: after the other hot-path test, this second compile of select would be
    # traced with dynamic shapes (a fixed candidate count compiles once, with static ones).
    torch._dynamo.reset()
    idx, x, y = _lm_batch(6)
    model = _TinyLM(6)
    store = _token_store(y, 6)
    sel = OnlineBatchSelector(model, store, k=4, invalid="keep", score_mode="current", backend="reference",
                              head=lambda m: m.lm_head, forward=lambda m, x: m.hidden(x), chunk_size=16)
    got = torch.compile(sel.select, fullgraph=True, backend="eager")((idx, x, y))
    want = _lm_selector(model, store, k=4, invalid="keep").select((idx, x, y))
    assert torch.equal(got[0], want[0])


# ---------------------------------------------------------------------------- costs, cheap scoring, late check
def test_summary_reports_what_selection_cost():
    model, store = _model(), _store()
    sel = OnlineBatchSelector(model, store, k=8)
    for step in range(3):
        idx, x, y = _batch(step)
        _, xb, yb = sel.select((idx, x, y))
        token = sel.stats.start("train", "cpu")
        F.cross_entropy(model(xb), yb).backward()
        sel.stats.stop(token)
    s = sel.stats.summary()
    assert s["candidates"] == 3 * N and s["picks"] == 24
    assert s["scoring_seconds"] > 0 and s["selection_seconds"] > 0 and s["train_seconds"] > 0
    sel_t = s["scoring_seconds"] + s["selection_seconds"]
    assert s["scoring_time_fraction"] == pytest.approx(sel_t / (sel_t + s["train_seconds"]))
    assert s["step_overhead"] == pytest.approx(sel_t / s["train_seconds"])  # both timed every step
    assert "noisy_pick_fraction" not in s and "noisy_candidate_fraction" not in s  # no noisy= given
    sel.select(_batch(), noisy=torch.zeros(N, dtype=torch.bool))
    assert sel.stats.summary()["noisy_pick_fraction"] == 0.0
    # without a timed training step the fractions are unknown; timing=False records no time
    quiet = OnlineBatchSelector(model, store, k=8, timing=False)
    quiet.select(_batch())
    q = quiet.stats.summary()
    assert q["scoring_seconds"] == 0 and math.isnan(q["scoring_time_fraction"]) and math.isnan(q["train_seconds"])
    with pytest.raises(ValueError, match="timed region"):
        sel.stats.start("forward", "cpu")


def _bad_store():
    losses = torch.rand(N)
    losses[8:] = math.nan  # 8 scored rows: k = 10 leaves 2 invalid picks
    return IrreducibleLossStore(losses, check=False)


def test_invalid_raise_late_check_raises_at_the_next_step_or_at_check_invalid():
    # invalid_check="late" is the accelerators' default ("auto"); on the CPU it runs the same code
    model = _model()
    sel = OnlineBatchSelector(model, _bad_store(), k=10, invalid_check="late")
    good = OnlineBatchSelector(model, _store(), k=10, invalid_check="late")
    sub = sel.select(_batch())  # the bad batch is returned (full size) ...
    assert sub[0].shape == (10,) and not sel.last.valid.all()
    with pytest.raises(ValueError, match=r"2 of this rank's 10 picks are not eligible.*NaN score.*step 1: checked a step late"):
        sel.select(_batch(1))  # ... and the next select raises, before scoring anything
    assert sel.step == 1 and sel.stats.steps == 1
    sel.select(_batch(2))  # the flag was consumed: the run can go on (and is bad again)
    with pytest.raises(ValueError, match="step 2: checked a step late"):
        sel.check_invalid()  # the end of a loop: the last step's flag
    sel.check_invalid()  # nothing pending
    for step in range(3):  # valid batches never raise
        good.select(_batch(step))
    good.check_invalid()
    # "now" raises at the bad step itself, as the CPU default ("auto") does
    with pytest.raises(ValueError, match="not eligible"):
        OnlineBatchSelector(model, _bad_store(), k=10, invalid_check="now").select(_batch())
    with pytest.raises(ValueError, match="not eligible"):
        OnlineBatchSelector(model, _bad_store(), k=10).select(_batch())
    with pytest.raises(ValueError, match="invalid_check"):
        OnlineBatchSelector(model, _store(), k=10, invalid_check="never")


def test_late_check_reads_nothing_from_the_step_it_runs_in(monkeypatch):
    # The late path never reads the current step's tensors on the host (on a GPU such a read is
    # a sync): the only host read in select() is the previous step's flag, already copied.
    # Spies on the training layer's Python-level reads (the op layer checks targets on the host
    # for CPU tensors only, where that is free); torch.cuda.set_sync_debug_mode covers the GPU
    # (next test).
    import sys

    model = _model()
    store = IrreducibleLossStore(_store().losses, check=False)  # the store's NaN check is a CPU-only read
    sel = OnlineBatchSelector(model, store, k=10, invalid_check="late")
    sel.select(_batch())
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            if "rho_kernels/training" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                reads.append((_name, self))
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in range(1, 4):
        previous = sel._pending.host
        reads.clear()
        sel.select(_batch(step))
        assert [(n, t is previous) for n, t in reads] == [("__bool__", True)], reads
    monkeypatch.undo()
    sel.check_invalid()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU logic is tested above)")
def test_default_raise_does_not_sync_per_step_on_cuda():
    model = _model().cuda()
    store = IrreducibleLossStore(_store().losses.cuda(), check=False)
    sel = OnlineBatchSelector(model, store, k=8)
    batches = [tuple(t.cuda() for t in _batch(s)) for s in range(3)]
    sel.select(batches[0])  # warm-up (lazy initialisation may sync once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            sel.select(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sel.check_invalid()
    assert sel.stats.summary()["scoring_seconds"] > 0  # timing events, read here


def test_inference_mode_and_compiled_forward_pick_what_eager_scoring_picks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))
    store = _store()
    want = [OnlineBatchSelector(model, store, k=12).select(_batch(s))[0] for s in range(2)]
    buffers = [b.clone() for b in model.buffers()]
    calls = []

    def counting_forward(m, x):
        calls.append(1)
        return m(x)

    fast = OnlineBatchSelector(model, store, k=12, inference_mode=True, forward=counting_forward,
                               compile_forward={"backend": "eager"})
    got = [fast.select(_batch(s))[0] for s in range(2)]
    for a, b in zip(got, want):
        assert torch.equal(a, b) and not a.is_inference()  # the picked rows serve autograd
    compiled = fast._compiled
    assert compiled is not None and fast._scoring_forward() is compiled  # compiled once, cached
    assert calls  # the user's forward runs inside the compiled function
    for a, b in zip(model.buffers(), buffers):  # train-mode BatchNorm scoring left no trace
        assert torch.equal(a, b)
    assert "inference_mode=True" in repr(fast) and "compile_forward" in repr(fast)
    with pytest.raises(TypeError, match="inference_mode"):
        OnlineBatchSelector(model, store, inference_mode=1)
    with pytest.raises(TypeError, match="compile_forward"):
        OnlineBatchSelector(model, store, compile_forward="yes")
