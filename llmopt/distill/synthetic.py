"""Teacher-written training windows: more text when the training corpus is small.

A student trained for several passes over a few hundred thousand tokens starts to learn that text
instead of the teacher (its training loss keeps falling while the held-out perplexity stops). The
teacher's own samples are text it assigns high probability to, so matching its distributions on
them teaches the same function on contexts the corpus does not have. Each sample continues a short
stretch of the training text (so it stays near the corpus' domain), is sampled at temperature 1
with top-p 0.95 (the tail of a small model's distribution is mostly noise), and runs to the full
window length with end-of-sequence suppressed, so the windows pack like the corpus' own.
"""

from __future__ import annotations

import time

import torch

from llmopt.kv_cache import cache_kwargs
from llmopt.progress import SILENT, Progress

PROMPT_TOKENS = 32      # text tokens from the corpus that each sample continues
TOP_P = 0.95
GENERATE_BATCH = 32     # sequences sampled together (the decode steps are small matmuls otherwise)


def _prompts(chunks: torch.Tensor, count: int, bos: bool, generator: torch.Generator) -> torch.Tensor:
    """`count` stretches of PROMPT_TOKENS text tokens at random places of the corpus, BOS first when
    the windows have one."""
    text = (chunks[:, 1:] if bos else chunks).reshape(-1)
    starts = torch.randint(0, text.numel() - PROMPT_TOKENS, (count,), generator=generator)
    prompts = torch.stack([text[s: s + PROMPT_TOKENS] for s in starts.tolist()])
    return torch.cat([chunks[:1, :1].expand(count, 1), prompts], dim=1) if bos else prompts


def _sample(teacher, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    config = teacher.generation_config
    eos = config.eos_token_id if config is not None else None
    pad = eos[0] if isinstance(eos, list) and eos else eos
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=TOP_P, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    with torch.no_grad():     # llmopt's in-place cache: transformers' copies the whole cache every token
        return teacher.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=settings,
                                **cache_kwargs(teacher))


def teacher_windows(teacher, chunks: torch.Tensor, count: int, bos: bool, seed: int, stop_at: float | None = None,
                    progress: Progress = SILENT) -> torch.Tensor:
    """Up to `count` windows shaped like `chunks` ([n, seq_len]), each a corpus prompt continued by the
    teacher. Sampling stops early, with the windows written so far, once time.monotonic() passes
    `stop_at`, so a time budget is not spent on text there is no time left to train on."""
    seq_len = chunks.shape[1]
    new_tokens = seq_len - PROMPT_TOKENS - int(bos)
    if count <= 0 or new_tokens <= 0:
        return chunks[:0]
    device = next(teacher.parameters()).device
    prompts = _prompts(chunks, count, bos, torch.Generator().manual_seed(seed))
    out: list[torch.Tensor] = []
    progress.start("Teacher writing training text", total=count)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, count, GENERATE_BATCH):
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            batch = prompts[i: i + GENERATE_BATCH].to(device)
            out.append(_sample(teacher, batch, new_tokens)[:, :seq_len].cpu())
            progress.advance(len(batch))
    progress.finish()
    return torch.cat(out) if out else chunks[:0]
