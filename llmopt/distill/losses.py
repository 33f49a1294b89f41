"""Distillation losses on logits and hidden states.

All divergences compare distributions per token and return the mean over tokens. Logits are
softened by the temperature T and the divergence is multiplied by T^2, so the gradient scale does
not shrink as T grows (Hinton et al.; the DistilBERT / Minitron choice) and `--alpha-ce` keeps the
same meaning at any temperature.

- `fkl`: forward KL(teacher || student), mode-covering; the default.
- `rkl`: reverse KL(student || teacher), mode-seeking (MiniLLM).
- `jsd`: generalized Jensen-Shannon divergence with mixture M = beta*teacher + (1-beta)*student,
  beta*KL(teacher || M) + (1-beta)*KL(student || M) (the GKD definition); beta=0.5 is the classic JSD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token from log-probabilities over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


CHUNK_ELEMENTS = 1 << 21   # logits per chunk of the fused forward KL: 8 MB float32 temporaries stay in cache


class _ForwardKL(torch.autograd.Function):
    """KL(teacher || student) whose gradient, T (q - p) / n per token, is computed in the forward
    pass chunk by chunk. Autograd through log_softmax would keep several [tokens, vocab] float32
    temporaries (hundreds of MB per step at a 50k vocabulary) and traverse them again backward."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
        vocab = student_logits.shape[-1]
        s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        n, rows = s.shape[0], max(1, CHUNK_ELEMENTS // vocab)
        grad = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, rows):
            log_q = F.log_softmax(s[i: i + rows].float() / temperature, dim=-1)
            log_p = F.log_softmax(t[i: i + rows].float() / temperature, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum(dtype=torch.float64)
            grad[i: i + rows] = log_q.exp_().sub_(p).mul_(temperature / n)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        return (total * (temperature * temperature / n)).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if not (grad_output.numel() == 1 and grad_output.item() == 1.0):   # the common case saves a pass
            grad = grad * grad_output
        return grad.reshape(ctx.shape).to(ctx.dtype), None, None


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl",
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Mean per-token divergence between the softened distributions, scaled by T^2.

    The logits' last dimension is the vocabulary; any leading dimensions are tokens. Computed in
    float32 whatever the input dtype: bf16 log-probabilities lose the small differences KD learns from.
    The teacher's logits get no gradient from `fkl` (the teacher is frozen).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    t = float(temperature)
    if kind == "fkl":
        return _ForwardKL.apply(student_logits, teacher_logits, t)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if kind == "rkl":
        per_token = _kl(log_q, log_p)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        per_token = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    else:
        raise ValueError(f"unknown divergence '{kind}', expected one of {LOSSES}")
    return per_token.mean() * (t * t)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The ordinary language-model loss: position i predicts token i+1."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs (student hidden-state index, teacher hidden-state index) for the outputs of every
    student layer; a shallower student's layer j is matched with the teacher layer at the same depth
    fraction. Index 0 (the embeddings) is left out."""
    return [(j, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over matched layers of the relative squared error ||h_s - h_t||^2 / ||h_t||^2.

    Relative rather than raw MSE because decoder hidden states carry a few huge "massive activation"
    channels whose raw error would drown every other layer and channel.
    """
    pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    terms = []
    for s, t in pairs:
        hs, ht = student_hidden[s].float(), teacher_hidden[t].float()
        terms.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def combined(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
             kind: str = "fkl", temperature: float = 1.0, beta: float = 0.5, alpha_ce: float = 0.0,
             hidden_weight: float = 0.0, student_hidden=None, teacher_hidden=None) -> dict[str, torch.Tensor]:
    """(1 - alpha_ce) * divergence + alpha_ce * CE + hidden_weight * hidden MSE; returns every term.

    Logits are compared over the vocabulary both models share (`vocab` columns); padded rows past
    the tokenizer's size are never targets.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s_logits, t_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
    terms: dict[str, torch.Tensor] = {"kd": divergence(s_logits, t_logits, kind, temperature, beta)}
    loss = (1.0 - alpha_ce) * terms["kd"]
    if alpha_ce > 0:
        terms["ce"] = next_token_ce(student_logits, input_ids)
        loss = loss + alpha_ce * terms["ce"]
    if hidden_weight > 0:
        terms["hidden"] = hidden_mse(student_hidden, teacher_hidden)
        loss = loss + hidden_weight * terms["hidden"]
    terms["loss"] = loss
    return terms
