"""Perplexity and bits per byte of a model on wiki.test.raw with and without a BOS first in each window.

Scores the same text tokens three ways, with llmopt's evaluation (`llmopt.bench.quality`):
`bos`: BOS + seq_len - 1 text tokens, the prediction from the BOS alone not scored (llmopt's
convention when the tokenizer adds a BOS); `no-bos`: the same seq_len - 1 text tokens without it;
`no-bos-full`: seq_len text tokens without BOS (llmopt's convention before, and still for
tokenizers that add none). Gemma's tokenizer adds a BOS; SmolLM2's does not (its bos_token is
<|im_start|>, which is also measured here as a first token).

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \\
        python benchmarks/bos_perplexity.py --model gemma3-270m --windows 4 --runs bos no-bos
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmopt.bench.quality import compare_models
from llmopt.data import Windows, bos_id, cut_eval, load_text, tokenize_corpus
from llmopt.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--runs", nargs="+", choices=("bos", "no-bos", "no-bos-full"),
                    default=["bos", "no-bos", "no-bos-full"])
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu")
    tok = loaded.tokenizer
    text = load_text("wikitext2", "eval")
    corpus = tokenize_corpus(tok, text.text)
    bos = tok.bos_token_id
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; python {' '.join(sys.argv)}", flush=True)
    print(f"# {args.model}: bos_token {tok.bos_token!r} (id {bos}); the tokenizer adds it: {bos_id(tok) is not None}; "
          f"{args.windows} x {args.seq_len} tokens of {text.description}", flush=True)
    with_bos = cut_eval(corpus, args.seq_len, args.windows, bos)
    runs = {
        "bos": with_bos,
        "no-bos": Windows(with_bos.ids[:, 1:], False, with_bos.scored_bytes),
        "no-bos-full": cut_eval(corpus, args.seq_len, args.windows, None),
    }
    for name in args.runs:
        windows = runs[name]
        t0 = time.perf_counter()
        stats = compare_models([loaded.model], [windows])[0]
        print(f"{name:12s} ppl {stats.perplexity:8.3f}  bits/byte {stats.bits_per_byte:.4f}  "
              f"({stats.tokens} tokens scored, {stats.bytes} bytes, {time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
