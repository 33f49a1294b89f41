"""LLM.int8's outlier threshold on SmolLM2-135M: perplexity at each `--threshold`.

LLM.int8 multiplies each activation row in int8 except the input columns that hold a value above
the threshold, which go through float16. The paper's 6.0 was chosen for models of billions of
parameters; a small model's activations are rounded coarsely at that setting. This prints the
wiki.test.raw perplexity (first --windows x 2048 tokens, llmopt's `perplexity`) of the float32
model and of `llmopt quantize --method llm-int8 --threshold T` for every T given.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \\
        python benchmarks/llm_int8_threshold.py --windows 8 --thresholds 6 3 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llmopt.bench.quality import perplexity
from llmopt.data import load_windows
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 3.0, 2.0])
    args = ap.parse_args()

    base = load_model(args.model, device="cpu")
    evals = load_windows(base.tokenizer, "wikitext2", "eval", 2048, max_windows=args.windows)   # BOS not scored
    desc = evals.description
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; python {' '.join(sys.argv)}", flush=True)
    ppl0 = perplexity(base.model, evals)
    dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")
    print(f"{dtype}: ppl {ppl0:.3f} ({len(evals.ids)} x 2048 tokens of {desc})", flush=True)
    del base
    work = Path(tempfile.mkdtemp(prefix="int8-threshold-"))
    try:
        for t in args.thresholds:
            out = work / f"t{t:g}"
            quantize(QuantizeOptions(model=args.model, output=str(out), method="llm-int8", threshold=t, force=True))
            loaded = load_model(str(out), device="cpu")
            t0 = time.perf_counter()
            ppl = perplexity(loaded.model, evals)
            print(f"llm-int8 --threshold {t:g}: ppl {ppl:.3f} ({100 * (ppl / ppl0 - 1):+.2f}%), "
                  f"eval {time.perf_counter() - t0:.0f}s", flush=True)
            del loaded
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
