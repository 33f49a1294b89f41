"""Quality metrics on token windows: perplexity (GPTQ-paper convention), bits per byte and agreement
with a baseline. The one evaluation module: bench, distill and prune score through it.

Perplexity is exp(mean next-token NLL) over non-overlapping windows, each scored on its own, from
`Windows.first_target` on (a BOS position's prediction is not scored; a plain [n, seq_len] tensor is
scored from position 1). Perplexity is per token, so it only compares models that share a tokenizer;
bits per byte (summed NLL / ln 2 / UTF-8 bytes of the text the scored tokens cover, as
lm-evaluation-harness reports for WikiText) compares any two models on the same text.
Against a baseline on the same windows we also report the mean KL divergence KL(P_base || P_model)
of the next-token distributions and the top-1 agreement (how often both pick the same next token),
as llama.cpp's `perplexity --kl-divergence` does: they expose damage that perplexity averages away.

Full-vocabulary log-probabilities are large (seq_len x vocab x 4 bytes: 400 MB for SmolLM2 at 2048
tokens, 2 GB for Gemma3), so `compare_models` walks the windows one at a time and scores every model
on a window before moving on: only the baseline's log-probs and one model's logits for the current
window are ever held, and the comparison runs over chunks of positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from llmopt.data import Windows
from llmopt.models import model_device
from llmopt.progress import SILENT, Progress

CHUNK = 256   # positions per chunk when comparing full-vocabulary distributions


def as_windows(windows: torch.Tensor | Windows) -> Windows:
    """A plain [n, seq_len] tensor is text only: scored from position 1, bytes unknown."""
    return windows if isinstance(windows, Windows) else Windows(windows)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor | Windows, progress: Progress = SILENT,
               description: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window's scored targets ([n] float64), each window on its own."""
    w = as_windows(windows)
    progress.start(description, total=len(w))
    out = []
    for ids in w.ids:
        logits = _logits(model, ids, w.first_target).float()
        out.append(F.cross_entropy(logits, ids[w.first_target:].to(logits.device)).double().cpu())
        progress.advance(1, ppl=math.exp(torch.stack(out).mean().item()))
    progress.finish()
    return torch.stack(out)


def perplexity(model, windows: torch.Tensor | Windows, progress: Progress = SILENT) -> float:
    """exp(mean token NLL) over non-overlapping windows: all windows score the same number of tokens,
    so the mean of window means is the token mean."""
    return math.exp(window_nll(model, windows, progress).mean().item())


# --------------------------------------------------------------------------- comparison with a baseline

@dataclass
class WindowStats:
    """Sums over the scored positions of one or more windows (so they add up exactly)."""

    tokens: int = 0
    nll_sum: float = 0.0
    bytes: int | None = 0        # UTF-8 bytes the scored tokens cover (None: unknown for some window)
    kl_sum: float = 0.0
    agree: int = 0
    compared: int = 0            # positions compared against the baseline (0 = no comparison)
    window_nll: list[float] = field(default_factory=list)

    def add(self, other: "WindowStats") -> None:
        self.tokens += other.tokens
        self.nll_sum += other.nll_sum
        self.bytes = None if self.bytes is None or other.bytes is None else self.bytes + other.bytes
        self.kl_sum += other.kl_sum
        self.agree += other.agree
        self.compared += other.compared
        self.window_nll.extend(other.window_nll)

    @property
    def nll(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll) if self.tokens else None

    @property
    def bits_per_byte(self) -> float | None:
        """Summed NLL in bits per UTF-8 byte of the scored text: independent of the tokenizer."""
        return self.nll_sum / math.log(2) / self.bytes if self.tokens and self.bytes else None

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.compared if self.compared else None

    @property
    def top1_agreement(self) -> float | None:
        """Fraction in [0, 1]."""
        return self.agree / self.compared if self.compared else None


def baseline_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary, in float32, computed chunk by chunk in place when possible."""
    out = logits if logits.dtype == torch.float32 else torch.empty(logits.shape, dtype=torch.float32,
                                                                   device=logits.device)
    for s in range(0, logits.shape[0], CHUNK):
        out[s:s + CHUNK] = logits[s:s + CHUNK].float().log_softmax(-1)
    return out


def score_window(logits: torch.Tensor, targets: torch.Tensor, base_logp: torch.Tensor | None = None
                 ) -> WindowStats:
    """NLL of `targets` under `logits` ([T, V]); with `base_logp` ([T, V] log-probs of the baseline) also
    the summed KL(base || model) and the count of positions where both argmaxes agree."""
    stats = WindowStats(tokens=targets.numel())
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    agree = torch.zeros((), dtype=torch.long, device=logits.device)
    for s in range(0, logits.shape[0], CHUNK):
        logp = logits[s:s + CHUNK].float().log_softmax(-1)
        nll -= logp.gather(-1, targets[s:s + CHUNK, None]).double().sum()
        if base_logp is not None:
            b = base_logp[s:s + CHUNK]
            kl += (b.exp() * (b - logp)).sum(-1).double().sum()
            agree += (b.argmax(-1) == logp.argmax(-1)).sum()
    stats.nll_sum = nll.item()
    stats.window_nll = [stats.nll_sum / max(stats.tokens, 1)]
    if base_logp is not None:
        stats.kl_sum, stats.agree, stats.compared = kl.item(), int(agree.item()), targets.numel()
    return stats


@torch.inference_mode()
def _logits(model, window: torch.Tensor, first_target: int = 1) -> torch.Tensor:
    """[T, V] logits predicting window[first_target:]."""
    ids = window.unsqueeze(0).to(model_device(model))
    return model(ids).logits[0, first_target - 1:-1]


def _score(w: Windows, k: int, logits: torch.Tensor, base_logp: torch.Tensor | None = None) -> WindowStats:
    """Window k of `w` scored from the model's `logits` for it (compared with `base_logp` when given)."""
    stats = score_window(logits, w.ids[k][w.first_target:].to(logits.device), base_logp)
    stats.bytes = None if w.scored_bytes is None else int(w.scored_bytes[k])
    return stats


@torch.inference_mode()
def compare_models(models: list, windows: list[torch.Tensor | Windows], baseline: int = 0,
                   progress: Progress = SILENT, same_tokenizer: list[bool] | None = None) -> list[WindowStats]:
    """Score every model on its windows; compare with the baseline those that share its tokenizer.

    `windows[i]` are the windows for `models[i]`; a model is compared (KL, top-1) only when its
    windows are the baseline's, its vocabulary is as wide, and `same_tokenizer[i]` (when given) holds;
    the others get perplexity and bits per byte only. A model object given twice is run once per
    window; the baseline object given again is its own reference (KL 0, agreement 100%).
    """
    windows = [as_windows(w) for w in windows]
    results = [WindowStats() for _ in models]
    base_model, base_w = models[baseline], windows[baseline]
    comparable = [i != baseline and (same_tokenizer is None or same_tokenizer[i]) and w.bos == base_w.bos
                  and torch.equal(w.ids, base_w.ids) for i, w in enumerate(windows)]
    n = max(len(w) for w in windows)
    progress.start(f"quality: {n} windows x {len(models)} model(s)", total=n)
    for k in range(n):
        base_stats = base_logp = None
        if k < len(base_w):
            logits = _logits(base_model, base_w.ids[k], base_w.first_target)
            base_stats = _score(base_w, k, logits)
            base_logp = baseline_logprobs(logits) if any(comparable) else None
            del logits
        cache: dict[tuple[int, bool], WindowStats] = {}
        for i, model in enumerate(models):
            w = windows[i]
            if k >= len(w):
                continue
            if model is base_model and (i == baseline or comparable[i]):
                stats = base_stats if not comparable[i] else replace(
                    base_stats, kl_sum=0.0, agree=base_stats.tokens, compared=base_stats.tokens,
                    window_nll=list(base_stats.window_nll))
            elif (id(model), comparable[i]) in cache:
                stats = cache[(id(model), comparable[i])]
            else:
                logits = _logits(model, w.ids[k], w.first_target)
                if comparable[i] and logits.shape[-1] != base_logp.shape[-1]:
                    comparable[i] = False      # another vocabulary: perplexity and bits per byte only
                stats = _score(w, k, logits, base_logp if comparable[i] else None)
                cache[(id(model), comparable[i])] = stats
                del logits
            results[i].add(stats)
        del base_logp
        progress.advance(1, **{f"ppl{i}": round(r.perplexity, 3) for i, r in enumerate(results) if r.tokens})
    progress.finish()
    return results
