"""GPTQ calibrated with and without a BOS first in every calibration window, scored the same way.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \\
        python benchmarks/bos_calibration.py --model gemma3-270m --nsamples 16 --seq-len 512 --windows 4

`bos` is what `llmopt quantize` does for a tokenizer that adds a BOS (Gemma's): each calibration
window is BOS + seq_len - 1 text tokens. `no-bos` drops that first column, so the very same text
tokens calibrate without it (the windows are one token shorter). Both checkpoints are then loaded
through llmopt's runtime (`--head full`, the checkpoint as written) and scored on the first
`--windows` windows of `--eval-seq-len` tokens (default 2048) of wiki.test.raw with BOS first (bench's convention, docs/bench.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmopt.quantize.pipeline as pipeline
from llmopt.bench.quality import perplexity
from llmopt.data import load_windows
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize

_with_bos = pipeline._calibration


def _without_bos(opts: QuantizeOptions, path: Path) -> tuple[torch.Tensor, str]:
    ids, description = _with_bos(opts, path)
    return ids[:, 1:].contiguous(), description + "; BOS column dropped"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--eval-seq-len", type=int, default=2048, help="tokens per evaluation window")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; python {' '.join(sys.argv)}", flush=True)
    base = load_model(args.model, device="cpu")
    evals = load_windows(base.tokenizer, "wikitext2", "eval", args.eval_seq_len, max_windows=args.windows)
    if not evals.bos:
        raise SystemExit(f"{args.model}'s tokenizer adds no BOS: nothing to compare")
    print(f"original: ppl {perplexity(base.model, evals):.3f} ({len(evals.ids)} x {args.eval_seq_len}, "
          f"{evals.description})", flush=True)
    del base
    work = Path(tempfile.mkdtemp(prefix="bos-calib-"))
    for label, calibration in (("bos", _with_bos), ("no-bos", _without_bos)):
        pipeline._calibration = calibration
        out = work / label
        t = time.perf_counter()
        quantize(QuantizeOptions(model=args.model, output=str(out), calib="wikitext2", nsamples=args.nsamples,
                                 seq_len=args.seq_len, seed=0, device="cpu"))
        took = time.perf_counter() - t
        loaded = load_model(str(out), device="cpu", head="full")
        print(f"GPTQ 4-bit, calibration {label}: ppl {perplexity(loaded.model, evals):.3f} "
              f"(quantize {took:.0f}s)", flush=True)
        del loaded
    pipeline._calibration = _with_bos


if __name__ == "__main__":
    main()
