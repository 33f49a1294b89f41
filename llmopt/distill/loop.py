"""The distillation training loop: frozen teacher, trained student, held-out evaluation, best checkpoint.

Parallelism comes from accelerate: under `accelerate launch` every process trains on its own share
of the batches (DDP, or FSDP when the accelerate config says so) and the optimizer steps stay in
lockstep; a plain `llmopt distill` is the one-process case of the same code. The learning-rate
schedule is computed here (linear warmup, then cosine to zero) and written into the optimizer, so
it means the same thing however many processes run.

The clock is agreed between processes (the largest elapsed time wins), so the learning rate and
the decision to stop on --max-minutes are the same everywhere; Ctrl-C ends the loop with the best state seen so far, which the caller saves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from llmopt.bench.quality import window_nll
from llmopt.data import Windows
from llmopt.distill.losses import combined
from llmopt.distill.synthetic import teacher_windows
from llmopt.progress import SILENT, Progress


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    max_grad_norm: float
    loss: str
    temperature: float
    beta: float
    alpha_ce: float
    hidden_mse: float
    eval_every: int
    max_minutes: float | None
    seed: int
    bos: bool = False                   # every training window starts with the tokenizer's BOS
    synthetic_windows: int = 0          # teacher-sampled windows added to the training text
    ema: float = 0.0                    # decay of the moving average of the student's weights (0 = none)


@dataclass
class Result:
    steps_done: int
    stopped: str                        # "completed" | "time budget" | "interrupted"
    curve: list[dict] = field(default_factory=list)   # one row per evaluation
    best_step: int = 0
    best_ppl: float = math.inf
    best_state: dict | None = None      # CPU copy of the student's weights at best_step (main process)
    best_weights: str = "trained"       # "trained" or "average": which weights best_state holds
    teacher_ppl: float | None = None
    tokens: int = 0                     # training tokens seen by the student, all processes together
    synthetic_windows: int = 0          # teacher-sampled windows written (fewer than asked when time ran short)
    synthetic_seconds: float = 0.0
    train_seconds: float = 0.0


def lr_at(step: int, total: int, warmup: int, peak: float, time_fraction: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to zero.

    With a time budget, `time_fraction` (the share of it used so far) advances the decay when the
    budget would end before `total` steps, so a run cut short by --max-minutes still anneals.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max((step - warmup) / span, time_fraction))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _recut(chunks: torch.Tensor, offset: int, bos: bool) -> torch.Tensor:
    """The text of `chunks` (consecutive windows, BOS first in each when `bos`) cut again `offset`
    tokens later; the last, partial window is dropped."""
    body = chunks[:, 1:] if bos else chunks
    span = body.shape[1]
    text = body.reshape(-1)[offset:]
    n = text.numel() // span
    windows = text[: n * span].view(n, span)
    return torch.cat([chunks[:n, :1], windows], dim=1) if bos else windows


def batches(chunks: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1, bos: bool = False,
            extra: torch.Tensor | None = None):
    """Endless micro-batches of packed sequences, each process taking every `world`-th sequence of a
    fresh seeded shuffle every epoch, so processes never train on the same text in one epoch.

    A run of a few hundred thousand tokens repeats its text; every epoch after the first cuts it at
    a new random offset, so a token is not always predicted from the same context. `extra` windows
    (the teacher's samples: separate texts, not one) join every epoch as they are."""
    epoch = 0
    span = chunks.shape[1] - int(bos)
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        windows = chunks
        if epoch and span > 1:
            shifted = _recut(chunks, int(torch.randint(1, span, (1,), generator=g)), bos)
            windows = shifted if len(shifted) >= batch_size * world else chunks
        if extra is not None and len(extra):
            windows = torch.cat([windows, extra])
        order = torch.randperm(len(windows), generator=g)[rank::world]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[i: i + batch_size]]
        epoch += 1


def _elapsed(accelerator, started: float) -> float:
    """Seconds since `started`, the largest over processes: lr and stopping must agree everywhere
    (different learning rates would let DDP replicas drift, a lone stop would hang collectives)."""
    seconds = time.monotonic() - started
    if accelerator.num_processes == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="max").item())


def _snapshot(accelerator, model) -> dict | None:
    """A CPU copy of the full student state (gathered under FSDP); kept on the main process only."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


_Evaluate = Callable[[int, float | None, Progress], None]


def trained_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights training updates (and averages): those not frozen (`--freeze-embeddings`)."""
    return [p for p in model.parameters() if p.requires_grad]


class Average:
    """An exponential moving average of the trained weights (Polyak averaging). A student that learns a
    small corpus by heart generalizes better from an average over its last steps than from any one of
    them; the decay ramps up from 0.1 so early weights fade out fast."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = trained_weights(model)
        self.values = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.values, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    def swap(self) -> None:
        """Exchange the model's weights with the average (no copies); call again to swap back."""
        for p, v in zip(self.params, self.values):
            p.data, v.data = v.data, p.data


def _evaluator(accelerator, model, eval_windows: Windows | torch.Tensor, result: Result, total: int,
               started: float, progress: Progress, average: Average | None = None) -> _Evaluate:
    """Scores the student on the held-out windows, appends a curve row, and keeps the best state so far:
    the trained weights' or, with an average, whichever of the two scores lower."""
    bare = accelerator.unwrap_model(model)

    def score(weights: str, step: int, show: Progress) -> float:
        bare.eval()
        ppl = math.exp(window_nll(bare, eval_windows, show, "Student held-out perplexity").mean().item())
        bare.train()
        if ppl < result.best_ppl:
            result.best_ppl, result.best_step, result.best_weights = ppl, step, weights
            result.best_state = _snapshot(accelerator, model)
        return ppl

    def evaluate(step: int, train_loss: float | None, show: Progress) -> None:
        before = result.best_ppl
        row = {"step": step, "ppl": round(score("trained", step, show), 4)}
        if average is not None and step:
            average.swap()
            try:
                row["ppl_average"] = round(score("average", step, show), 4)
            finally:
                average.swap()
        row.update(train_loss=train_loss, tokens=result.tokens, elapsed_s=round(time.monotonic() - started, 1))
        result.curve.append(row)
        where = f"step {step}/{total}" if step else "before training"
        shown = f"held-out perplexity {row['ppl']:.3f}" + (
            f", averaged weights {row['ppl_average']:.3f}" if "ppl_average" in row else "")
        progress.note(f"{where}: {shown} (teacher {result.teacher_ppl:.3f})"
                      + ("  best so far" if result.best_ppl < before and step else ""))

    return evaluate


def _accumulate(model, teacher, data, cfg: LoopConfig, accelerator) -> dict[str, float]:
    """Forward and backward over `grad_accum` micro-batches; gradients sync between processes only on
    the last one. Returns each loss term averaged over the micro-batches."""
    need_hidden = cfg.hidden_mse > 0
    step_terms: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        ids = next(data).to(accelerator.device)
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with torch.no_grad(), accelerator.autocast():
                t_out = teacher(ids, output_hidden_states=need_hidden, use_cache=False)
            s_out = model(ids, output_hidden_states=need_hidden, use_cache=False)
            terms = combined(s_out.logits, t_out.logits, ids, kind=cfg.loss, temperature=cfg.temperature,
                             beta=cfg.beta, alpha_ce=cfg.alpha_ce, hidden_weight=cfg.hidden_mse,
                             student_hidden=s_out.hidden_states if need_hidden else None,
                             teacher_hidden=t_out.hidden_states if need_hidden else None)
            accelerator.backward(terms["loss"] / cfg.grad_accum)
        for k, v in terms.items():
            step_terms[k] = step_terms.get(k, 0.0) + v.item() / cfg.grad_accum
        del t_out, s_out, terms
    return step_terms


def _optimizer_step(model, teacher, optimizer, data, cfg: LoopConfig, accelerator, lr: float) -> dict[str, float]:
    """One optimizer step at learning rate `lr`, gradients clipped when --max-grad-norm is set."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_terms = _accumulate(model, teacher, data, cfg, accelerator)
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_terms


def _run_steps(model, teacher, optimizer, train_chunks: torch.Tensor, extra: torch.Tensor | None, cfg: LoopConfig,
               accelerator, evaluate: _Evaluate, result: Result, started: float, progress: Progress,
               average: Average | None = None) -> None:
    """The optimizer steps, evaluating every --eval-every steps, at the end, and when the time budget runs out."""
    data = batches(train_chunks, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
                   cfg.bos, extra)
    tokens_per_step = cfg.batch_size * train_chunks.shape[1] * cfg.grad_accum * accelerator.num_processes
    budget = cfg.max_minutes * 60 if cfg.max_minutes is not None else None
    losses: list[float] = []
    for step in range(cfg.steps):
        t0 = time.monotonic()
        used = _elapsed(accelerator, started) / budget if budget else 0.0
        lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr, used)
        step_terms = _optimizer_step(model, teacher, optimizer, data, cfg, accelerator, lr)
        if average is not None:
            average.update()
        result.steps_done = step + 1
        result.tokens += tokens_per_step
        losses.append(step_terms["loss"])
        elapsed = time.monotonic() - t0
        live = {"loss": step_terms["loss"], "kd": step_terms["kd"], "lr": lr,
                "tok_s": round(tokens_per_step / max(elapsed, 1e-9))}
        if result.curve:
            live["ppl"] = result.curve[-1]["ppl"]
        progress.advance(1, **live)

        n = step + 1
        out_of_time = budget is not None and _elapsed(accelerator, started) >= budget
        if (cfg.eval_every > 0 and n % cfg.eval_every == 0) or n == cfg.steps or out_of_time:
            evaluate(n, round(sum(losses) / len(losses), 5), SILENT)
            losses.clear()
        if out_of_time and n < cfg.steps:
            result.stopped = "time budget"
            progress.note(f"--max-minutes {cfg.max_minutes:g} reached after {n} of {cfg.steps} steps")
            break


def _synthetic(teacher, train_chunks: torch.Tensor, cfg: LoopConfig, accelerator, result: Result, started: float,
               progress: Progress) -> torch.Tensor | None:
    """The teacher's samples, written on the training clock and within half of a time budget (the
    rest is for training on them). Every process writes the same ones (same seed) and trains on its
    own share of the batches, as with the corpus."""
    if cfg.synthetic_windows <= 0:
        return None
    t0 = time.monotonic()
    stop_at = started + cfg.max_minutes * 30 if cfg.max_minutes is not None else None
    with accelerator.autocast():
        extra = teacher_windows(teacher, train_chunks, cfg.synthetic_windows, cfg.bos, cfg.seed, stop_at, progress)
    result.synthetic_windows, result.synthetic_seconds = len(extra), round(time.monotonic() - t0, 1)
    if len(extra) < cfg.synthetic_windows:
        progress.note(f"half of --max-minutes spent writing text: {len(extra)} of {cfg.synthetic_windows} "
                      "teacher-written windows")
    return extra


def train(student, teacher, train_chunks: torch.Tensor, eval_windows: Windows | torch.Tensor, cfg: LoopConfig,
          accelerator, progress: Progress = SILENT) -> Result:
    """Distill `teacher` into `student` (already placed on accelerator.device); returns the curve and
    the best weights. The student is left with its last weights, not the best ones. Held-out windows
    are scored by bench's `window_nll` (a BOS window from its first text token on); the training loss
    covers every position, the prediction from the BOS included."""
    started = time.monotonic()
    result = Result(steps_done=0, stopped="completed")
    teacher.eval().requires_grad_(False)

    with accelerator.autocast():        # the student's forward is autocast too (accelerator.prepare)
        result.teacher_ppl = math.exp(window_nll(teacher, eval_windows, progress, "Teacher held-out perplexity")
                                      .mean().item())

    optimizer = torch.optim.AdamW(trained_weights(student), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model, optimizer = accelerator.prepare(student, optimizer)
    average = Average(accelerator.unwrap_model(model), cfg.ema) if cfg.ema > 0 else None
    evaluate = _evaluator(accelerator, model, eval_windows, result, cfg.steps, started, progress, average)
    try:
        evaluate(0, None, progress)
        model.train()
        extra = _synthetic(teacher, train_chunks, cfg, accelerator, result, started, progress)
        progress.start("Distilling", total=cfg.steps)
        _run_steps(model, teacher, optimizer, train_chunks, extra, cfg, accelerator, evaluate, result, started,
                   progress, average)
        progress.finish()
    except KeyboardInterrupt:
        progress.finish()
        if not result.curve:       # nothing measured yet, so there is no best checkpoint to keep
            raise
        result.stopped = "interrupted"
    result.train_seconds = round(time.monotonic() - started, 1)
    return result
