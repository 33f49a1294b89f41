"""Quality metrics on token windows: perplexity (GPTQ-paper convention) and agreement with a baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmopt.models import model_device
from llmopt.progress import SILENT, Progress


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, progress: Progress = SILENT, description: str = "perplexity"
               ) -> torch.Tensor:
    """Mean next-token NLL of each window ([n] float64), each window scored on its own."""
    device = model_device(model)
    progress.start(description, total=len(windows))
    out = []
    for w in windows:
        ids = w.unsqueeze(0).to(device)
        logits = model(ids).logits[0, :-1].float()
        out.append(F.cross_entropy(logits, ids[0, 1:], reduction="mean").double().cpu())
        progress.advance(1, ppl=math.exp(torch.stack(out).mean().item()))
    progress.finish()
    return torch.stack(out)


def perplexity(model, windows: torch.Tensor, progress: Progress = SILENT) -> float:
    """exp(mean token NLL) over non-overlapping windows: all windows have equal length, so the mean
    of window means is the token mean."""
    return math.exp(window_nll(model, windows, progress).mean().item())
