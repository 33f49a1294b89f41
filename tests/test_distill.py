"""Distillation: the losses against hand-computed values, the loop on tiny models, bad input, Ctrl-C."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmopt.distill import DistillOptions, distill
from llmopt.distill.loop import lr_at
from llmopt.distill.losses import combined, divergence, hidden_mse, layer_map
from llmopt.errors import UserError
from llmopt.progress import Progress

from conftest import build_tiny
from test_data import bos_tokenizer  # noqa: F401 - a tokenizer that puts BOS first, as Gemma's does


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ----------------------------------------------------------------------------- losses

def test_forward_and_reverse_kl_by_hand():
    t, s = _logits(0.5, 0.5), _logits(0.25, 0.75)
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert divergence(s, t, "fkl").item() == pytest.approx(fkl, rel=1e-5)
    assert divergence(s, t, "rkl").item() == pytest.approx(rkl, rel=1e-5)
    assert fkl != pytest.approx(rkl)   # the example tells the two directions apart


def test_generalized_jsd_by_hand():
    p, q = [0.5, 0.5], [0.25, 0.75]
    t, s = _logits(*p), _logits(*q)
    for beta in (0.5, 0.2):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m))
        kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m))
        expect = beta * kl_pm + (1 - beta) * kl_qm
        assert divergence(s, t, "jsd", beta=beta).item() == pytest.approx(expect, rel=1e-5)
    # the classic JSD is symmetric
    assert divergence(s, t, "jsd").item() == pytest.approx(divergence(t, s, "jsd").item(), rel=1e-6)


def test_temperature_softens_and_scales_by_t_squared():
    teacher = torch.tensor([0.0, 2 * math.log(3.0)])   # /2 -> probabilities 1/4, 3/4
    student = torch.tensor([0.0, 0.0])                 # 1/2, 1/2 at any temperature
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert divergence(student, teacher, "fkl", temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_identical_distributions_have_zero_divergence(kind):
    x = torch.randn(2, 7, 33)
    assert divergence(x, x.clone(), kind, temperature=1.7).item() == pytest.approx(0.0, abs=1e-6)
    assert divergence(torch.randn(2, 7, 33), x, kind).item() > 0


def test_divergence_is_a_token_mean():
    t, s = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    per_token = [divergence(s[i, j], t[i, j]).item() for i in range(3) for j in range(5)]
    assert divergence(s, t).item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_forward_kl_gradient_equals_autograd_of_the_formula(monkeypatch, temperature):
    """fkl computes its gradient chunk by chunk in the forward pass; it must equal autograd's
    through the plain formula, over several chunks and a vocabulary slice (a strided view)."""
    import llmopt.distill.losses as losses
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4 * 11)   # 4 tokens per chunk
    s0, t = torch.randn(3, 5, 13, dtype=torch.float64), torch.randn(3, 5, 11)
    s = s0.clone().requires_grad_(True)
    divergence(s[..., :11], t, "fkl", temperature=temperature).mul(3.0).backward()
    ref = s0.clone().requires_grad_(True)
    log_q = F.log_softmax(ref[..., :11] / temperature, dim=-1)
    log_p = F.log_softmax(t.double() / temperature, dim=-1)
    expect = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2
    (expect * 3.0).backward()
    got = divergence(s0[..., :11], t, "fkl", temperature=temperature)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert s.grad.shape == ref.grad.shape and s.grad.dtype == torch.float64
    assert torch.allclose(s.grad, ref.grad, atol=1e-6)
    assert s.grad[..., 11:].abs().max() == 0 and ref.grad.abs().max() > 1e-3


def test_ce_mixing_and_shared_vocabulary():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 6))
    s, t = torch.randn(2, 6, 12), torch.randn(2, 6, 10)     # the student's head is padded to 12 rows
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 12), ids[:, 1:].reshape(-1)).item()
    kd = divergence(s[..., :10], t).item()
    terms = combined(s, t, ids, alpha_ce=0.3)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-5)
    assert combined(s, t, ids, alpha_ce=1.0)["loss"].item() == pytest.approx(ce, rel=1e-5)


def test_hidden_mse_matches_layers_and_is_relative():
    assert layer_map(4, 8) == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    h = tuple(torch.randn(1, 4, 8) for _ in range(4))
    assert hidden_mse(h, h).item() == 0.0
    doubled = tuple(2 * x for x in h)
    assert hidden_mse(h, doubled).item() == pytest.approx(0.25, rel=1e-5)   # ||x - 2x||^2 / ||2x||^2


def test_learning_rate_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0) < 0.001


@pytest.mark.parametrize("bos", [False, True])
def test_later_epochs_cut_the_text_at_a_new_offset(bos):
    """Epoch 1 trains on the windows as cut; every later epoch on the same text cut at a fresh
    offset, BOS kept first, so no token sits at the same window position every epoch."""
    from llmopt.distill.loop import batches

    span, n = 7, 6
    text = torch.arange(n * span)
    chunks = text.view(n, span)
    if bos:
        chunks = torch.cat([torch.full((n, 1), -1), chunks], dim=1)
    data = batches(chunks, 2, seed=3, bos=bos)
    epochs = [torch.cat([next(data) for _ in range(k)]) for k in (3, 2, 2, 2)]   # n, then n - 1 per epoch
    assert sorted(epochs[0].tolist()) == sorted(chunks.tolist())
    starts = set()
    for windows in epochs[1:]:
        assert windows.shape == (4, chunks.shape[1])
        body = windows[:, 1:] if bos else windows
        assert not bos or (windows[:, 0] == -1).all()
        assert (body.diff(dim=1) == 1).all()                              # contiguous slices of the text
        offsets = {int(row[0]) % span for row in body}
        assert len(offsets) == 1 and offsets != {0}                       # one offset per epoch, not 0
        starts |= offsets
    assert len(starts) > 1                                                 # and not the same every epoch


def test_teacher_written_windows_join_every_epoch_as_they_are():
    from llmopt.distill.loop import batches

    chunks = torch.arange(6 * 8).view(6, 8)
    extra = torch.full((3, 8), -5)
    data = batches(chunks, 3, seed=1, extra=extra)
    for _ in range(3):                                                     # 9 windows per epoch, 3 batches
        epoch = torch.cat([next(data) for _ in range(3)])
        assert (epoch == -5).all(dim=1).sum() == 3                         # all three, unchanged
        assert ((epoch >= 0).all(dim=1)).sum() == 6


def test_weight_average_follows_the_trained_weights_and_swaps_back():
    from llmopt.distill.loop import Average

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)                  # frozen weights are not averaged
    start = model.weight.detach().clone()
    average = Average(model, decay=0.9)
    expected = start.clone()
    for t in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update()
        decay = min(0.9, (1 + t) / (10 + t))          # ramps up from 0.1
        expected = decay * expected + (1 - decay) * model.weight.detach()
    assert len(average.values) == 1
    torch.testing.assert_close(average.values[0], expected)
    trained = model.weight.detach().clone()
    average.swap()
    torch.testing.assert_close(model.weight.detach(), expected)
    average.swap()
    assert torch.equal(model.weight.detach(), trained)


def test_evaluation_keeps_the_better_of_trained_and_averaged_weights(tiny_tokenizer):
    from accelerate import Accelerator

    from llmopt.distill.loop import Average, Result, _evaluator
    from llmopt.progress import SILENT

    torch.manual_seed(0)
    good = build_tiny("llama", tiny_tokenizer)         # trained on the held-out windows below: the better one
    windows = torch.randint(0, 200, (2, 32))
    model = build_tiny("llama", tiny_tokenizer)
    opt = torch.optim.AdamW(good.parameters(), lr=1e-2)
    for _ in range(20):
        good(windows, labels=windows).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    for weights, expect in ((good, "average"), (model, "trained")):
        average = Average(model, decay=0.5)
        for value, param in zip(average.values, weights.parameters()):
            value.copy_(param.detach())
        if weights is model:           # the average is now worse than the trained weights
            torch._foreach_mul_(average.values, 3.0)
        result = Result(steps_done=0, stopped="completed", teacher_ppl=1.0)
        evaluate = _evaluator(Accelerator(cpu=True), model, windows, result, 4, 0.0, SILENT, average)
        evaluate(4, 0.5, SILENT)
        row = result.curve[-1]
        assert result.best_weights == expect
        assert result.best_ppl == pytest.approx(min(row["ppl"], row["ppl_average"]), rel=1e-4)
        kept = good.state_dict() if expect == "average" else trained
        assert all(torch.equal(result.best_state[k], kept[k]) for k in kept)
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())   # swapped back


# ----------------------------------------------------------------------------- tiny teacher -> tiny student

@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tiny_tokenizer):
    """A tiny llama trained for a few seconds on the builtin text, so it has something to teach."""
    from llmopt.data import text_windows

    torch.manual_seed(0)
    model = build_tiny("llama", tiny_tokenizer).train()
    windows, _ = text_windows(tiny_tokenizer, "builtin", "calib", 64, nsamples=480, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in windows.view(-1, 8, 64):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("teacher")
    model.eval().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pair(tmp_path, tiny_tokenizer, trained_teacher):
    """The trained teacher and a narrower, untrained student with the same tokenizer."""
    student = build_tiny("llama", tiny_tokenizer, intermediate_size=64)
    student.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    return trained_teacher, tmp_path / "student"


def _opts(teacher, student, out, **kw) -> DistillOptions:
    base = dict(data="builtin", steps=12, seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4,
                eval_windows=4, device="cpu")
    base.update(kw)
    return DistillOptions(teacher=str(teacher), student=str(student), output=str(out), **base)


def _heldout_kl(teacher_dir, student_dir, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    from llmopt.data import text_windows

    windows, _ = text_windows(tokenizer, "builtin", "eval", 64, max_windows=4)
    t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        return divergence(s(windows).logits, t(windows).logits).item()


def test_distilling_lowers_kl_to_the_teacher(pair, tmp_path, tiny_tokenizer):
    teacher, student = pair
    out = tmp_path / "kd"
    summary = distill(_opts(teacher, student, out, steps=30, eval_every=10))
    before = _heldout_kl(teacher, student, tiny_tokenizer)
    after = _heldout_kl(teacher, out, tiny_tokenizer)
    assert after < 0.8 * before, (before, after)
    assert summary["steps_done"] == 30 and summary["stopped"] == "completed"
    assert [row["step"] for row in summary["curve"]] == [0, 10, 20, 30]
    assert summary["student_heldout_ppl_best"] < summary["student_heldout_ppl_before"]
    record = json.loads((out / "llmopt.json").read_text())
    assert record["command"] == "distill" and record["teacher"] == str(teacher)
    assert record["metrics"]["best_step"] == summary["best_step"] > 0


@pytest.mark.parametrize("loss,extra", [("rkl", {}), ("jsd", {"beta": 0.3}),
                                        ("fkl", {"alpha_ce": 0.5, "hidden_mse": 1.0, "temperature": 2.0,
                                                 "grad_accum": 2, "gradient_checkpointing": True})])
def test_other_losses_and_options_train(pair, tmp_path, loss, extra):
    teacher, student = pair
    summary = distill(_opts(teacher, student, tmp_path / "kd", steps=8, loss=loss, **extra))
    assert summary["student_heldout_ppl_best"] < summary["student_heldout_ppl_before"]
    assert summary["tokens_trained"] == 8 * 4 * 64 * extra.get("grad_accum", 1)


def test_distill_scores_and_keeps_averaged_weights(pair, tmp_path):
    teacher, student = pair
    summary = distill(_opts(teacher, student, tmp_path / "kd", ema=0.9))
    rows = summary["curve"]
    assert "ppl_average" not in rows[0] and all("ppl_average" in row for row in rows[1:])
    scores = [row["ppl"] for row in rows] + [row["ppl_average"] for row in rows[1:]]
    assert summary["student_heldout_ppl_best"] == pytest.approx(min(scores), rel=1e-3)
    assert summary["best_weights"] in ("trained", "average")
    record = json.loads((tmp_path / "kd" / "llmopt.json").read_text())
    assert record["parameters"]["ema"] == 0.9 and record["metrics"]["best_weights"] == summary["best_weights"]


def test_windows_start_with_bos_and_its_prediction_is_not_scored(tmp_path, bos_tokenizer, monkeypatch):
    """With a tokenizer that puts BOS first, every training and held-out window is BOS + seq_len - 1 text
    tokens in order, and held-out perplexity scores the text tokens after the first, not the BOS's guess."""
    import llmopt.distill as distill_module
    from transformers import AutoModelForCausalLM

    from llmopt.data import load_text, tokenize

    for name, width in (("teacher", 160), ("student", 64)):
        build_tiny("llama", bos_tokenizer, intermediate_size=width).save_pretrained(tmp_path / name)
        bos_tokenizer.save_pretrained(tmp_path / name)
    seen = {}
    real = distill_module.train

    def spy(student, teacher, train_chunks, eval_windows, *rest):
        seen.update(train=train_chunks, held=eval_windows)
        return real(student, teacher, train_chunks, eval_windows, *rest)

    monkeypatch.setattr(distill_module, "train", spy)
    summary = distill(_opts(tmp_path / "teacher", tmp_path / "student", tmp_path / "o", steps=1, eval_every=0))
    bos = bos_tokenizer.bos_token_id
    windows = torch.cat([seen["train"], seen["held"].ids])
    assert windows.shape[1] == 64 and (windows[:, 0] == bos).all()
    text = tokenize(bos_tokenizer, load_text("builtin", "train").text)
    assert torch.equal(windows[:, 1:].reshape(-1), text[: len(windows) * 63])
    assert seen["held"].bos and len(seen["held"]) == 4 and summary["bos_per_window"]

    held = seen["held"].ids
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()(held).logits.double()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), held[:, 1:], reduction="none")    # [4, 63]
    text_only = math.exp(nll[:, 1:].mean(1).mean().item())
    with_bos_guess = math.exp(nll.mean(1).mean().item())
    assert summary["teacher_heldout_ppl"] == pytest.approx(text_only, rel=1e-4)
    assert abs(with_bos_guess - text_only) > 1e-3 * text_only      # the two conventions do differ here


@pytest.mark.parametrize("bos", [False, True])
def test_teacher_continues_the_training_text(trained_teacher, tiny_tokenizer, bos):
    """Each written window is BOS (when the corpus has one) + a stretch of the corpus + the teacher's
    sampled continuation, as long as a corpus window; seeded; and nothing is written past the deadline."""
    import time

    from transformers import AutoModelForCausalLM

    from llmopt.distill.synthetic import PROMPT_TOKENS, teacher_windows

    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher).eval()
    text = torch.tensor(tiny_tokenizer(" ".join(["the cat sat on the mat and looked at the dog"] * 40))["input_ids"])
    span = 64 - int(bos)
    chunks = text[: (text.numel() // span) * span].view(-1, span)
    if bos:
        chunks = torch.cat([torch.full((len(chunks), 1), 1), chunks], dim=1)
    written = teacher_windows(teacher, chunks, 5, bos, seed=0)
    assert written.shape == (5, 64)
    assert not bos or (written[:, 0] == 1).all()
    flat = text.tolist()
    for row in written[:, int(bos):].tolist():
        prompt = row[:PROMPT_TOKENS]
        assert any(flat[i: i + PROMPT_TOKENS] == prompt for i in range(len(flat) - PROMPT_TOKENS))
    assert not any(row[int(bos):] in (chunks[:, int(bos):].tolist()) for row in written.tolist())   # new text
    assert torch.equal(teacher_windows(teacher, chunks, 5, bos, seed=0), written)
    assert not torch.equal(teacher_windows(teacher, chunks, 5, bos, seed=1), written)
    assert len(teacher_windows(teacher, chunks, 5, bos, seed=0, stop_at=time.monotonic() - 1)) == 0


def test_teacher_writes_more_windows_than_the_corpus_has(trained_teacher, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from llmopt.distill.synthetic import teacher_windows

    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher).eval()
    text = torch.tensor(tiny_tokenizer(" ".join(["a bird flew over the quiet river"] * 30))["input_ids"])
    chunks = torch.cat([torch.full((3, 1), 1), text[: 3 * 47].view(3, 47)], dim=1)     # 3 windows, BOS first
    written = teacher_windows(teacher, chunks, 5, bos=True, seed=0)
    assert written.shape == (5, 48) and (written[:, 0] == 1).all()


def test_distill_trains_on_teacher_written_windows(pair, tmp_path):
    teacher, student = pair
    summary = distill(_opts(teacher, student, tmp_path / "kd", steps=6, synthetic_windows=3))
    assert summary["synthetic_windows"] == 3 and summary["synthetic_seconds"] > 0
    assert summary["student_heldout_ppl_best"] < summary["student_heldout_ppl_before"]
    assert json.loads((tmp_path / "kd" / "llmopt.json").read_text())["parameters"]["synthetic_windows"] == 3


@pytest.mark.parametrize("precision,bf16", [("bf16", True), ("auto", False), ("bf16", True), ("float32", False)])
def test_precision_of_student_and_teacher(pair, tmp_path, monkeypatch, precision, bf16):
    """--precision bf16 runs both models' forward passes under bf16 autocast; auto on CPU and float32
    run float32; runs of either kind follow each other in one process."""
    import llmopt.distill.loop as loop

    teacher, student = pair
    seen: set[tuple[str, torch.dtype]] = set()
    real = loop._accumulate

    def spy(model, teacher_model, *args, **kw):       # the dtype each side's layers compute in while training
        hooks = [m.model.layers[0].mlp.down_proj.register_forward_hook(
                     lambda _m, _i, o, who=who: seen.add((who, o.dtype)))
                 for who, m in (("student", model), ("teacher", teacher_model))]
        try:
            return real(model, teacher_model, *args, **kw)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(loop, "_accumulate", spy)
    summary = distill(_opts(teacher, student, tmp_path / "kd", steps=3, precision=precision))
    expected = torch.bfloat16 if bf16 else torch.float32
    assert seen == {("student", expected), ("teacher", expected)}
    assert summary["mixed_precision"] == ("bf16" if bf16 else "no") and summary["teacher_dtype"] == "float32"
    assert summary["student_heldout_ppl_best"] < summary["student_heldout_ppl_before"]


def test_time_budget_stops_early(pair, tmp_path):
    teacher, student = pair
    summary = distill(_opts(teacher, student, tmp_path / "kd", steps=10_000, max_minutes=0.002))
    assert summary["stopped"] == "time budget" and summary["steps_done"] < 10_000
    assert summary["curve"][-1]["step"] == summary["steps_done"]   # the last step was evaluated
    assert (tmp_path / "kd" / "config.json").is_file()


class _CtrlC(Progress):
    """Presses Ctrl-C during the training step `at`."""

    def __init__(self, at: int) -> None:
        self.at, self.steps, self.notes = at, 0, []

    def start(self, description, total=None):
        self.training = description == "Distilling"

    def advance(self, steps=1, **info):
        if getattr(self, "training", False):
            self.steps += steps
            if self.steps == self.at:
                raise KeyboardInterrupt

    def note(self, message):
        self.notes.append(message)


def test_interrupt_saves_complete_best_so_far(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student = pair
    out = tmp_path / "kd"
    progress = _CtrlC(at=7)
    summary = distill(_opts(teacher, student, out, steps=100, eval_every=3), progress)
    assert summary["stopped"] == "interrupted"
    assert summary["best_step"] in (0, 3, 6) and [r["step"] for r in summary["curve"]] == [0, 3, 6]
    assert any("interrupted" in n and "best checkpoint so far" in n for n in progress.notes)
    model = AutoModelForCausalLM.from_pretrained(out)       # a complete standard checkpoint
    assert model.config.intermediate_size == 64
    assert json.loads((out / "llmopt.json").read_text())["metrics"]["stopped"] == "interrupted"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_cli_interrupt_exits_130_and_says_what_was_saved(pair, tmp_path, cli, monkeypatch):
    import llmopt.cli.distill as cli_distill

    monkeypatch.setattr(cli_distill, "RichProgress", lambda show: _CtrlC(at=2))
    teacher, student = pair
    out = tmp_path / "kd"
    code, _, err = cli("distill", "--teacher", teacher, "--student", student, "-o", out, "--data", "builtin",
                       "--steps", "50", "--seq-len", "64", "--batch-size", "2", "--eval-every", "1",
                       "--eval-windows", "2", "--device", "cpu")
    assert code == 130, err
    assert "best checkpoint so far" in err and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_embeddings_stay_as_they_were_and_the_rest_trains(tmp_path, tiny_tokenizer, trained_teacher, tied):
    from transformers import AutoModelForCausalLM

    start = build_tiny("llama", tiny_tokenizer, intermediate_size=64, tie_word_embeddings=tied)
    start.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    summary = distill(_opts(trained_teacher, tmp_path / "student", tmp_path / "kd", steps=6, freeze_embeddings=True))
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "kd")
    assert torch.equal(after.get_input_embeddings().weight, start.get_input_embeddings().weight)
    assert torch.equal(after.get_output_embeddings().weight, start.get_output_embeddings().weight)
    assert not torch.equal(after.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert summary["student_heldout_ppl_best"] < summary["student_heldout_ppl_before"]
    frozen = start.get_input_embeddings().weight.numel() * (1 if tied else 2)
    assert summary["trained_parameters"] == summary["student_parameters"] - frozen


def test_cli_json(pair, tmp_path, cli):
    teacher, student = pair
    out = tmp_path / "kd"
    code, stdout, err = cli("distill", "--teacher", teacher, "--student", student, "-o", out, "--data", "builtin",
                            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2",
                            "--loss", "jsd", "--device", "cpu", "--freeze-embeddings", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["trained_parameters"] < summary["student_parameters"]
    assert summary["steps_done"] == 3 and summary["output"] == str(out)
    assert summary["data"].startswith("builtin:")
    code, _, err = cli("distill", "--teacher", teacher, "--student", student, "-o", out, "--data", "builtin",
                       "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2")
    assert code == 2 and "already exists" in err


# ----------------------------------------------------------------------------- bad input

def _bad(cli, *args, match: str):
    code, out, err = cli("distill", *args)
    assert code == 2, (code, err)
    assert match.lower() in err.lower(), err
    return err


def test_tokenizer_mismatch_is_refused_before_loading(pair, tmp_path, cli):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    teacher, student = pair
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(list(topics.values())[:50], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(student)
    err = _bad(cli, "--teacher", teacher, "--student", student, "-o", tmp_path / "o", "--data", "builtin",
               match="tokenizers differ")
    assert not (tmp_path / "o").exists()
    assert "error" in err


def test_bad_values_fail_fast(pair, tmp_path, cli):
    teacher, student = pair
    common = ("--teacher", teacher, "--student", student, "-o", tmp_path / "o")
    _bad(cli, *common, "--steps", "0", match="--steps must be positive")
    _bad(cli, *common, "--steps", "-3", match="--steps must be positive")
    _bad(cli, *common, "--loss", "mse", match="unknown --loss")
    _bad(cli, *common, "--loss", "jsd", "--beta", "1", match="--beta")
    _bad(cli, *common, "--temperature", "0", match="--temperature")
    _bad(cli, *common, "--alpha-ce", "1.5", match="--alpha-ce")
    _bad(cli, *common, "--synthetic-windows", "-1", match="--synthetic-windows cannot be negative")
    _bad(cli, *common, "--precision", "fp8", match="unknown --precision")
    _bad(cli, *common, "--ema", "1", match="--ema must be in")
    _bad(cli, *common, "--data", tmp_path / "missing.txt", match="neither a file")
    _bad(cli, *common, "--data", "wikitext2", "--data-dir", tmp_path, match="holds none of")
    assert not (tmp_path / "o").exists()


def test_too_little_text(pair, tmp_path, cli):
    teacher, student = pair
    small = tmp_path / "small.txt"
    small.write_text("Only a few words of text here.")
    _bad(cli, "--teacher", teacher, "--student", student, "-o", tmp_path / "o", "--data", small,
         match="not enough")


def test_quantized_student_is_refused(pair, tmp_path, cli):
    teacher, student = pair
    cfg = json.loads((student / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (student / "config.json").write_text(json.dumps(cfg))
    _bad(cli, "--teacher", teacher, "--student", student, "-o", tmp_path / "o", "--data", "builtin",
         match="is quantized (gptq)")


def test_hidden_mse_needs_equal_widths(tmp_path, tiny_tokenizer, cli):
    dirs = []
    for name, hidden in (("t", 64), ("s", 32)):
        build_tiny("llama", tiny_tokenizer, hidden_size=hidden, head_dim=8).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    _bad(cli, "--teacher", dirs[0], "--student", dirs[1], "-o", tmp_path / "o", "--data", "builtin",
         "--hidden-mse", "1", match="equal hidden sizes")


def test_options_validate_without_loading():
    with pytest.raises(UserError, match="--eval-windows"):
        DistillOptions(teacher="a", student="b", output="o", eval_windows=0).validate()
    with pytest.raises(UserError, match="--max-minutes"):
        DistillOptions(teacher="a", student="b", output="o", max_minutes=0).validate()


def test_module_entry_point_parses_for_accelerate_launch():
    """`accelerate launch -m llmopt distill ...` runs `python -m llmopt distill ...` in each process."""
    done = subprocess.run([sys.executable, "-m", "llmopt", "distill", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--grad-accum" in done.stdout and "--max-minutes" in done.stdout


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_distills_into_itself_from_zero_kl(tmp_path, smollm2, wikitext_dir):
    """The real tokenizer passes the check, and a student equal to its teacher starts at KL 0."""
    summary = distill(DistillOptions(teacher="smollm2-135m", student=str(smollm2.path), output=str(tmp_path / "o"),
                                     data="wikitext2", data_dir=str(wikitext_dir), steps=1, seq_len=64,
                                     batch_size=1, eval_windows=2, lr=1e-6, device="cpu"))
    assert summary["student_heldout_ppl_before"] == pytest.approx(summary["teacher_heldout_ppl"], rel=1e-4)
    assert summary["curve"][1]["train_loss"] == pytest.approx(0.0, abs=1e-4)
