"""Rho1Trainer and RhoLossTrainer over real (few-step, CPU) transformers.Trainer runs.

Tiny randomly initialised models built from configs (2-layer Llama, hidden 64, vocab 1000; a
2-layer BERT for sequence classification); token ids are generated directly, nothing is
downloaded.  Every expectation is recomputed by hand from the same inputs and weights.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # CI installs it (requirements.txt)

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from _spawn import launch  # noqa: E402  (tests/ is on the path)
from rho_kernels.integrations import transformers as rkt  # noqa: E402
from rho_kernels.tokens import kept_count  # noqa: E402
from rho_kernels.training import IrreducibleLossStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 1000, 12
RATIO = 0.6


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def lm_dataset(n: int, seed: int = 0, with_reference=None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    labels[:, -2:][torch.rand(n, 2, generator=g) < 0.5] = -100  # some ignored targets
    items = []
    for i in range(n):
        item = {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        if with_reference is not None:
            item["reference_loss"] = with_reference[i]
        items.append(item)
    return items


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, optim="sgd", lr_scheduler_type="constant",
                weight_decay=0.0, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def hand_selective(model, ref_model, batch, ratio=RATIO, ref_col=None):
    """Rho-1 by hand: per-token CE, reference CE, top-k excess (ties to the lower index)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = batch["labels"][:, 1:]
        valid = t != -100
        ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), t.reshape(-1).clamp_min(0), reduction="none")
        if ref_col is not None:
            ref = ref_col[:, 1:].reshape(-1).float()
        else:
            rl = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            ref = F.cross_entropy(rl.float().reshape(-1, VOCAB), t.reshape(-1).clamp_min(0), reduction="none")
        excess = torch.where(valid.reshape(-1), ce - ref, torch.tensor(-float("inf")))
        k = kept_count(int(valid.sum()), ratio)  # the package's one rounding rule
        order = sorted(range(excess.numel()), key=lambda i: (-excess[i].item(), i))[:k]
        mask = torch.zeros(excess.numel(), dtype=torch.bool)
        mask[order] = True
        dropped = valid.reshape(-1) & ~mask
        return {
            "loss": ce[mask].mean().item(), "mask": mask.view(t.shape), "kept_fraction": k / int(valid.sum()),
            "excess_kept": excess[mask].mean().item(), "excess_dropped": excess[dropped].mean().item(),
        }


class Recording(rkt.Rho1Trainer):
    """Records each training micro-batch, the loss returned, the hand computation, and the
    gradients that reached the LM head's output (the logits, ``_grads``) and the last hidden
    state (``_hgrads``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []
        self._grads, self._hgrads = [], []
        self.model.lm_head.register_forward_hook(self._hook(self._grads))
        self.model.model.norm.register_forward_hook(self._hook(self._hgrads))

    @staticmethod
    def _hook(store):
        def hook(mod, inp, out):
            if out.requires_grad:
                out.register_hook(lambda g: None if g is None else store.append(g.detach().clone()))
        return hook

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            batch = {k: v.detach().clone() for k, v in inputs.items()}
            hand = hand_selective(model, self.reference_model, batch, self.keep_ratio,
                                  ref_col=batch.get("reference_loss"))
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.records.append({"batch": batch, "loss": loss.detach().item(), "hand": hand})
        return loss


def test_import_without_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n import rho_kernels.integrations.transformers\n"
            "except ImportError as e:\n print('MSG', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "pip install rho_kernels[transformers]" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_rho1_loss_gradient_and_logged_stats(tmp_path, path):
    """Both loss paths: from the logits, and from the last hidden state + LM head (fused, no logits)."""
    model, ref = tiny_llama(0), tiny_llama(1)
    tr = Recording(model=model, args=args(tmp_path), train_dataset=lm_dataset(8), reference_model=ref,
                   keep_ratio=RATIO, use_hidden_states=(path == "hidden"))
    tr.train()
    grads = tr._grads if path == "logits" else tr._hgrads
    assert len(tr.records) == 3 and len(grads) == 3
    if path == "hidden":
        assert tr._grads == []  # no gradient ever reached a logits tensor
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3
    for rec, grad, log in zip(tr.records, grads, logs):
        hand = rec["hand"]
        assert rec["loss"] == pytest.approx(hand["loss"], rel=1e-5, abs=1e-5)
        # only kept tokens get gradient: rows of d loss / d logits (or d hidden) are zero elsewhere
        row_nonzero = grad[:, :-1].abs().sum(-1) > 0
        assert torch.equal(row_nonzero, hand["mask"])
        assert grad[:, -1].abs().sum() == 0  # the last position predicts nothing
        assert log["rho1/kept_fraction"] == pytest.approx(hand["kept_fraction"], rel=1e-6)
        assert log["rho1/excess_kept"] == pytest.approx(hand["excess_kept"], rel=1e-4, abs=1e-4)
        assert log["rho1/excess_dropped"] == pytest.approx(hand["excess_dropped"], rel=1e-4, abs=1e-4)
        assert log["rho1/excess_kept"] > log["rho1/excess_dropped"]
        assert log["loss"] == pytest.approx(hand["loss"], abs=1e-3)  # the Trainer's (rounded) log
    # the model trained: its weights moved, the reference did not
    assert not torch.equal(model.lm_head.weight, tiny_llama(0).lm_head.weight)
    assert torch.equal(ref.lm_head.weight, tiny_llama(1).lm_head.weight)


def test_rho1_gradient_accumulation_matches_hand_sgd(tmp_path):
    """GA=2, SGD, one optimizer step: the update is lr * mean of the two micro-batch gradients."""
    model, ref = tiny_llama(0), tiny_llama(1)
    init = copy.deepcopy(model)
    lr = 0.05
    tr = Recording(model=model, args=args(tmp_path, gradient_accumulation_steps=2, max_steps=1, learning_rate=lr),
                   train_dataset=lm_dataset(8), reference_model=ref, keep_ratio=RATIO)
    tr.train()
    assert len(tr.records) == 2
    hand = copy.deepcopy(init)
    hand.train()
    for rec in tr.records:
        b = rec["batch"]
        logits = hand(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        t = b["labels"][:, 1:]
        mask = rec["hand"]["mask"]
        loss = F.cross_entropy(logits[mask].float(), t[mask]) / 2
        loss.backward()
    with torch.no_grad():
        for (name, p), q in zip(hand.named_parameters(), model.parameters()):
            expected = p - lr * p.grad if p.grad is not None else p
            torch.testing.assert_close(q, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_rho1_reference_column_and_resume(tmp_path):
    """Precomputed reference losses as a column; a run resumed from a Trainer checkpoint ends
    with the same weights as the uninterrupted run."""
    g = torch.Generator().manual_seed(5)
    ref_col = torch.rand(8, SEQ, generator=g) * 7
    data = lm_dataset(8, with_reference=ref_col)
    full = Recording(model=tiny_llama(0), args=args(tmp_path / "a", max_steps=4), train_dataset=data,
                     keep_ratio=0.5)
    full.train()
    for rec in full.records:
        assert rec["loss"] == pytest.approx(rec["hand"]["loss"], rel=1e-5, abs=1e-5)
        # ratio * n rounded to the nearest count: within half a token of 0.5 of the ~20 tokens
        assert abs(rec["hand"]["kept_fraction"] - 0.5) <= 0.5 / 16

    part = rkt.Rho1Trainer(model=tiny_llama(0), args=args(tmp_path / "b", max_steps=4, save_strategy="steps",
                                                           save_steps=2), train_dataset=data, keep_ratio=0.5)
    part.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed = rkt.Rho1Trainer(model=tiny_llama(3), args=args(tmp_path / "b", max_steps=4), train_dataset=data,
                              keep_ratio=0.5)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rho1_surfaces_a_nan_loss(tmp_path, monkeypatch):
    """A batch with nothing selectable (every reference loss NaN) and a diverged model (a NaN in
    the LM head) give NaN losses; the Trainer's logging_nan_inf_filter would log a stale average
    (or 0.0) instead: the log says NaN and how many, with a warning."""
    data = lm_dataset(4, with_reference=torch.full((4, SEQ), float("nan")))
    tr = rkt.Rho1Trainer(model=tiny_llama(0), args=args(tmp_path / "a", max_steps=2), train_dataset=data)
    monkeypatch.setattr(rkt.tokens, "_STARVED_WARNED", False)  # the op's own warning, once per process
    with pytest.warns(RuntimeWarning, match="counted tokens of a batch could be selected"), \
            pytest.warns(RuntimeWarning, match="loss\\(es\\) since the last log were NaN"):
        tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isnan(h["loss"]) and h["rho1/nonfinite_losses"] == 1 for h in logs)
    for hidden in (False, True):
        model = tiny_llama(0)
        with torch.no_grad():
            model.lm_head.weight[3, 5] = float("nan")
        tr = rkt.Rho1Trainer(model=model, args=args(tmp_path / f"b{hidden}", max_steps=1), use_hidden_states=hidden,
                             train_dataset=lm_dataset(4), reference_model=tiny_llama(1))
        with pytest.warns(RuntimeWarning, match="were NaN"):
            tr.train()
        log = next(h for h in tr.state.log_history if "loss" in h)
        assert math.isnan(log["loss"]) and log["rho1/nonfinite_losses"] == 1, (hidden, log)
        assert tr.use_hidden_states is hidden  # the hidden path ran (no fallback)


def _scaled_capped_models():
    """Tiny Gemma-2 (soft-capped logits), Cohere (multiplied by logit_scale) and Granite (divided
    by logits_scaling) causal LMs, each with a head large enough that the transform matters."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    yield "gemma2", transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **common, head_dim=16, final_logit_softcapping=2.0, attn_logit_softcapping=None)), dict(softcap=2.0,
                                                                                                 logit_scale=1.0)
    torch.manual_seed(0)
    yield "cohere", transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25)), dict(
        softcap=None, logit_scale=0.25)
    torch.manual_seed(0)
    yield "granite", transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=8.0)), dict(
        softcap=None, logit_scale=0.125)


def test_rho1_hidden_path_for_scaled_and_capped_heads(tmp_path):
    """Gemma-2 / Cohere / Granite heads take the hidden-state path (no [B, T, V] logits), and the
    loss and the head's gradient equal those of the logits path on the model's own logits."""
    batch = {k: torch.stack([it[k] for it in lm_dataset(4, seed=2)]) for k in ("input_ids", "attention_mask",
                                                                               "labels")}
    batch["reference_loss"] = torch.rand(4, SEQ, generator=torch.Generator().manual_seed(1)) * 9
    for name, model, want_transform in _scaled_capped_models():
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)  # logits of several units: the cap bites
        assert rkt.head_transform(model.config) == pytest.approx(want_transform), name
        losses, grads = {}, {}
        for hidden in (True, False):
            tr = rkt.Rho1Trainer(model=model, args=args(tmp_path / f"{name}{hidden}"), train_dataset=lm_dataset(4),
                                 use_hidden_states=hidden, log_selection_stats=hidden)
            model.train()
            model.zero_grad()
            seen = []
            hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
            loss = tr.compute_loss(model, dict(batch))
            hook.remove()
            loss.backward()
            assert tr._hidden_path(model) == hidden and tr.use_hidden_states is hidden, name  # no fallback
            if hidden:
                assert max(seen) <= 2, f"{name}: the hidden path computed the full logits ({seen})"
            losses[hidden], grads[hidden] = loss.item(), model.get_output_embeddings().weight.grad.clone()
        # The logits path reads the model's own (transformed) logits: the definition.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        own = rkt.tokens.selective_cross_entropy(logits, batch["labels"][:, 1:], batch["reference_loss"][:, 1:],
                                                 RATIO, backend="reference")
        assert losses[False] == pytest.approx(own.item(), rel=1e-6), name
        assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-5), name
        torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6, msg=name)
        # Untransformed, the loss would differ: the test sees the transform.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        raw = model.get_output_embeddings()(out.hidden_states[-1])[:, :-1]
        plain = rkt.tokens.selective_cross_entropy(raw, batch["labels"][:, 1:], batch["reference_loss"][:, 1:],
                                                   RATIO, backend="reference")
        assert abs(plain.item() - own.item()) > 1e-2, name


def test_rho1_falls_back_when_the_config_misleads(tmp_path):
    """A config attribute the model does not apply (a Llama with a stray logit_scale): the first
    step's check sees it, warns, and the loss comes from the model's own logits."""
    model = tiny_llama(0)
    model.config.logit_scale = 0.5
    batch = {k: torch.stack([it[k] for it in lm_dataset(2)]) for k in ("input_ids", "attention_mask", "labels")}
    batch["reference_loss"] = torch.rand(2, SEQ, generator=torch.Generator().manual_seed(1))
    tr = rkt.Rho1Trainer(model=model, args=args(tmp_path), train_dataset=lm_dataset(2), log_selection_stats=False)
    model.train()
    with pytest.warns(RuntimeWarning, match="logits are not the LM head's output"):
        loss = tr.compute_loss(model, dict(batch))
    assert tr.use_hidden_states is False
    strict = rkt.Rho1Trainer(model=model, args=args(tmp_path), train_dataset=lm_dataset(2), use_hidden_states=True)
    with pytest.raises(ValueError, match="use_hidden_states=True: LlamaForCausalLM's logits are not"):
        strict.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    own = rkt.tokens.selective_cross_entropy(logits, batch["labels"][:, 1:], batch["reference_loss"][:, 1:], RATIO)
    assert loss.item() == pytest.approx(own.item(), rel=1e-6)


def test_rho1_needs_a_reference(tmp_path):
    tr = rkt.Rho1Trainer(model=tiny_llama(0), args=args(tmp_path, max_steps=1), train_dataset=lm_dataset(4))
    with pytest.raises(ValueError, match="reference_model or a 'reference_loss' column"):
        tr.train()
    with pytest.raises(ValueError, match="ratio"):
        rkt.Rho1Trainer(model=tiny_llama(0), args=args(tmp_path), train_dataset=lm_dataset(4), keep_ratio=1.5)


def test_rho1_bf16_and_compiled_model(tmp_path):
    """bf16 autocast and a torch.compile'd model (aot_eager: no C compiler needed) train and
    select as many tokens as asked."""
    model = tiny_llama(0)
    dtypes = []
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    tr = rkt.Rho1Trainer(model=model, args=args(tmp_path, bf16=True, torch_compile=True,
                                                torch_compile_backend="aot_eager", max_steps=2),
                         train_dataset=lm_dataset(4), reference_model=tiny_llama(1))
    out = tr.train()
    assert tr.use_hidden_states == "auto"  # the hidden path's first-step check passed (no fallback)
    assert hasattr(tr.model_wrapped, "_orig_mod") or hasattr(tr.model, "_orig_mod")  # it was compiled
    assert torch.bfloat16 in dtypes  # the training forward ran under bf16 autocast
    assert torch.isfinite(torch.tensor(out.training_loss))
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert abs(log["rho1/kept_fraction"] - 0.6) <= 0.05  # 0.6 of the batch's tokens, rounded


# ------------------------------------------------------------------------------ RHO-LOSS
NB, NSMALL, NCLS = 8, 3, 3


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=NCLS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(cfg)


def cls_dataset(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (n, 10), generator=g)
    y = torch.randint(0, NCLS, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": y[i]}
            for i in range(n)]


class RecordingRho(rkt.RhoLossTrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []
        self.classifier_rows = []
        self.model.classifier.register_forward_hook(
            lambda m, i, o: self.classifier_rows.append((o.shape[0], o.requires_grad)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            b = {k: v.detach().clone() for k, v in inputs.items()}
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                ce = F.cross_entropy(logits, b["labels"], reduction="none")
                score = ce - self.selector.irreducible.gather(b["dataset_index"])
                order = sorted(range(len(score)), key=lambda i: (-score[i].item(), i))[:NSMALL]
                hand = {"rows": order, "loss": ce[order].mean().item(), "picked": score[order].mean().item(),
                        "not_picked": score[[i for i in range(len(score)) if i not in order]].mean().item()}
            self.classifier_rows.clear()
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.records.append({"batch": b, "hand": hand, "loss": loss.item(),
                                 "picked_index": self.selector.last.positions.tolist(),
                                 "forwards": list(self.classifier_rows)})
        return loss


def test_rho_loss_store_helper_matches_il_model():
    data = cls_dataset(20)
    il = tiny_bert(7)
    store = rkt.build_irreducible_loss_store(il, data, batch_size=6)
    assert isinstance(store, IrreducibleLossStore) and len(store) == 20
    il.eval()
    with torch.no_grad():
        for i in (0, 5, 19):
            logits = il(input_ids=data[i]["input_ids"][None], attention_mask=data[i]["attention_mask"][None]).logits
            ce = F.cross_entropy(logits, data[i]["labels"][None])
            assert store.gather(torch.tensor([i])).item() == pytest.approx(ce.item(), rel=1e-5)
    store.check_fingerprint(torch.stack([d["labels"] for d in data]))


def test_rho_loss_trainer_selects_and_trains_on_picks(tmp_path):
    data = cls_dataset(24)
    store = rkt.build_irreducible_loss_store(tiny_bert(7), data, batch_size=8)
    tr = RecordingRho(model=tiny_bert(0), args=args(tmp_path, per_device_train_batch_size=NB, max_steps=3),
                      train_dataset=data, irreducible_loss=store, n_b=NSMALL)
    tr.train()
    assert len(tr.records) == 3
    logs = [h for h in tr.state.log_history if "loss" in h]
    for rec, log in zip(tr.records, logs):
        assert rec["picked_index"] == rec["hand"]["rows"]
        assert rec["loss"] == pytest.approx(rec["hand"]["loss"], rel=1e-5)
        # scoring forward: n_B rows, no grad; training forward: only the n_b picks carry grad
        assert rec["forwards"] == [(NB, False), (NSMALL, True)]
        assert log["rho_loss/mean_score_picked"] == pytest.approx(rec["hand"]["picked"], rel=1e-4, abs=1e-5)
        assert log["rho_loss/mean_score_not_picked"] == pytest.approx(rec["hand"]["not_picked"], rel=1e-4, abs=1e-5)
        assert log["rho_loss/picks"] == NSMALL
        # what selection cost, against the timed forward/backward on the picks
        assert 0 < log["rho_loss/scoring_time_fraction"] < 1 and log["rho_loss/step_overhead"] > 0
    # the batches carried dataset indices that name their rows
    for rec in tr.records:
        for j, i in enumerate(rec["batch"]["dataset_index"].tolist()):
            assert torch.equal(rec["batch"]["input_ids"][j], data[i]["input_ids"])


def test_rho_loss_ratio_resume_and_checks(tmp_path):
    data = cls_dataset(24)
    store = rkt.build_irreducible_loss_store(tiny_bert(7), data, batch_size=8)
    kw = dict(train_dataset=data, irreducible_loss=store, ratio=0.25)
    full = rkt.RhoLossTrainer(model=tiny_bert(0), args=args(tmp_path / "a", per_device_train_batch_size=NB,
                                                             max_steps=4), **kw)
    full.train()
    assert full.selector.step == 4
    part = rkt.RhoLossTrainer(model=tiny_bert(0), args=args(tmp_path / "b", per_device_train_batch_size=NB,
                                                             max_steps=4, save_strategy="steps", save_steps=2), **kw)
    part.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    resumed = rkt.RhoLossTrainer(model=tiny_bert(5), args=args(tmp_path / "b", per_device_train_batch_size=NB,
                                                                max_steps=4), **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.selector.step == 4  # 2 restored + 2 run
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="store has 24 entries but the train dataset has 10"):
        rkt.RhoLossTrainer(model=tiny_bert(0), args=args(tmp_path), train_dataset=data[:10], irreducible_loss=store)


# ------------------------------------------------------------------------------ DDP (gloo, 2 ranks)
def _ddp_worker(rank, tmpdir, world):  # the Trainer initialises the group from the env
    import torch.distributed as dist

    model, ref = tiny_llama(0), tiny_llama(1)
    tr = Recording(model=model, args=args(__import__("pathlib").Path(tmpdir), max_steps=2, ddp_backend="gloo"),
                   train_dataset=lm_dataset(8), reference_model=ref, keep_ratio=RATIO)
    tr.train()
    assert dist.get_world_size() == world
    # each rank selected within its own micro-batch
    for rec in tr.records:
        assert rec["loss"] == pytest.approx(rec["hand"]["loss"], rel=1e-5, abs=1e-5)
    # the logged kept fraction is over both ranks' tokens
    mine = torch.tensor([[r["hand"]["mask"].sum().item(), (r["batch"]["labels"][:, 1:] != -100).sum().item()]
                         for r in tr.records], dtype=torch.float64)
    dist.all_reduce(mine)
    logs = [h for h in tr.state.log_history if "loss" in h]
    for (kept, counted), log in zip(mine.tolist(), logs):
        assert log["rho1/kept_fraction"] == pytest.approx(kept / counted, rel=1e-6)
    # the ranks saw different data and still hold the same (synchronised) weights
    w = model.lm_head.weight.detach().clone()
    ws = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(ws, w)
    assert torch.equal(ws[0], ws[1])
    ids = tr.records[0]["batch"]["input_ids"]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_ids, ids)
    assert not torch.equal(all_ids[0], all_ids[1])


def test_rho1_ddp_selects_per_rank(tmp_path):
    launch(_ddp_worker, 2, str(tmp_path), 2)
