"""llmopt's GGUF exports run in llama.cpp (through llama-cpp-python; not used by the tests):

- every exported file loads, and SmolLM2 greedy-completes "The capital of France is" with "Paris";
- a GPTQ w4 g32 checkpoint exported as Q4_0 (its own codes) against llama.cpp's own Q4_0 of the same
  original (llama.cpp's quantizer, `llama_model_quantize`, run on llmopt's f16 export), and the same for
  an asymmetric checkpoint as Q4_1: WikiText-2 test perplexity, KL divergence and top-1 agreement against
  the f16 export, file sizes.

    pip install 'llmopt[llamacpp]'
    llmopt quantize smollm2-135m -o out/g32 --group-size 32 --nsamples 64 --seq-len 512 --calib wikitext2
    llmopt quantize smollm2-135m -o out/g32a --group-size 32 --asym --nsamples 64 --seq-len 512 --calib wikitext2
    OMP_WAIT_POLICY=passive LLMOPT_DATA=/work/shared/data/wikitext-2-raw python benchmarks/gguf_llamacpp.py \\
        --model smollm2-135m --gptq out/g32 --gptq-asym out/g32a [--also gemma3-270m out/pruned] [--windows 8]

Evaluation: the first --windows non-overlapping --ctx-token windows of wiki.test.raw (rows joined with
blank lines), tokenized once with the model directory's Hugging Face tokenizer, so every file sees the
same token ids (a BOS first when the tokenizer adds one, as llama.cpp's perplexity does); each window is
one llama.cpp evaluation with all logits kept, and every position after the first is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from llmopt.export import ExportOptions, export

PROMPT = "The capital of France is"


def _llama(path: Path, ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def _reference_quantize(f16: Path, out: Path, ftype: str) -> None:
    """llama.cpp's own quantizer on llmopt's f16 export (the default mixture, no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[ftype]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16}")


def _windows(model_dir: Path, data_dir: Path, n: int, ctx: int) -> tuple[list[list[int]], list[int]]:
    """Token windows (BOS first if the tokenizer adds one) and the HF ids of the first 2,000 characters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join((data_dir / "wiki.test.raw").read_text(encoding="utf-8").split("\n"))
    ids = tok(text[: 400 * ctx * n], add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok("a")["input_ids"][:1] == [tok.bos_token_id] else []
    width = ctx - len(bos)
    windows = [bos + ids[i * width:(i + 1) * width] for i in range(n)]
    return windows, tok(text[:2000], add_special_tokens=False)["input_ids"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logprobs(llm, window: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(window)
    return _log_softmax(np.asarray(llm.scores[: len(window)]))


def _generate(llm) -> str:
    out = llm(PROMPT, max_tokens=12, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def evaluate(files: dict[str, Path], reference: str, windows: list[list[int]], hf_ids: list[int], ctx: int,
             threads: int, sample_text: str) -> dict[str, dict]:
    """Perplexity, KL(reference || file) and top-1 agreement, window by window with every file loaded."""
    llms = {label: _llama(path, ctx, threads) for label, path in files.items()}
    stats = {label: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for label in files}
    for w in windows:
        ref = _logprobs(llms[reference], w)
        targets = np.array(w[1:])
        for label, llm in llms.items():
            lp = ref if label == reference else _logprobs(llm, w)
            s = stats[label]
            s["nll"] -= float(lp[np.arange(len(w) - 1), targets].sum())
            s["kl"] += float((np.exp(ref[:-1]) * (ref[:-1] - lp[:-1])).sum())
            s["top1"] += int((ref[:-1].argmax(-1) == lp[:-1].argmax(-1)).sum())
            s["n"] += len(w) - 1
    results = {}
    for label, llm in llms.items():
        s = stats[label]
        results[label] = {"file": str(files[label]), "bytes": files[label].stat().st_size,
                          "ppl": math.exp(s["nll"] / s["n"]), "kl": s["kl"] / s["n"], "top1": s["top1"] / s["n"],
                          "generated": _generate(llm),
                          "tokenizer_matches_hf": llm.tokenize(sample_text.encode(), add_bos=False, special=False)
                          == hf_ids, "scored_tokens": s["n"]}
        print(f"{label}: {json.dumps(results[label])}", file=sys.stderr, flush=True)
    return results


def _export(model: str, out: Path, type_: str) -> dict:
    t = time.time()
    summary = export(ExportOptions(model=model, output=str(out), type=type_, force=True))
    summary["seconds"] = round(time.time() - t, 1)
    layers = summary.pop("layers")
    print(f"exported {model} -> {out.name}: {summary['type']}, {summary.get('mappings')}, "
          f"max rel error {summary.get('max_rel_error')}, {len(layers)} GPTQ layers", file=sys.stderr, flush=True)
    return summary


def _table(results: dict[str, dict], ref_sizes: dict[str, int]) -> str:
    rows = ["| file | size MB | size vs llama.cpp same type | ppl | KL vs f16 | top-1 vs f16 | greedy completion |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, r in results.items():
        ratio = r["bytes"] / ref_sizes[label] if label in ref_sizes else None
        rows.append(f"| {label} | {r['bytes'] / 1e6:.1f} | {f'{ratio:.3f}x' if ratio else '-'} | {r['ppl']:.3f} | "
                    f"{r['kl']:.4f} | {r['top1']:.2%} | {r['generated'].strip()[:40]!r} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--gptq", required=True, help="GPTQ w4 g32 symmetric checkpoint of --model")
    p.add_argument("--gptq-asym", help="GPTQ w4 g32 asymmetric checkpoint of --model")
    p.add_argument("--also", nargs="*", default=[], help="more models exported (auto type) and loaded, generation only")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/llmopt-gguf-bench")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(os.environ.get("LLMOPT_DATA", ""))
    if not (data / "wiki.test.raw").is_file():
        raise SystemExit("set LLMOPT_DATA to the folder holding wiki.test.raw")

    from llmopt.models import local_dir

    exports = {"f16 (llmopt)": _export(args.model, work / "f16.gguf", "f16"),
               "GPTQ g32 Q4_0 (llmopt)": _export(args.gptq, work / "gptq-q4_0.gguf", "auto")}
    files = {"f16 (llmopt)": work / "f16.gguf", "GPTQ g32 Q4_0 (llmopt)": work / "gptq-q4_0.gguf"}
    _reference_quantize(work / "f16.gguf", work / "llamacpp-q4_0.gguf", "q4_0")
    files["Q4_0 (llama.cpp)"] = work / "llamacpp-q4_0.gguf"
    ref_sizes = {"GPTQ g32 Q4_0 (llmopt)": files["Q4_0 (llama.cpp)"].stat().st_size}
    if args.gptq_asym:
        exports["GPTQ g32 asym Q4_1 (llmopt)"] = _export(args.gptq_asym, work / "gptq-q4_1.gguf", "auto")
        files["GPTQ g32 asym Q4_1 (llmopt)"] = work / "gptq-q4_1.gguf"
        _reference_quantize(work / "f16.gguf", work / "llamacpp-q4_1.gguf", "q4_1")
        files["Q4_1 (llama.cpp)"] = work / "llamacpp-q4_1.gguf"
        ref_sizes["GPTQ g32 asym Q4_1 (llmopt)"] = files["Q4_1 (llama.cpp)"].stat().st_size
    windows, hf_ids = _windows(local_dir(args.model).path, data, args.windows, args.ctx)
    sample = "\n\n".join((data / "wiki.test.raw").read_text(encoding="utf-8").split("\n"))[:2000]
    results = evaluate(files, "f16 (llmopt)", windows, hf_ids, args.ctx, args.threads, sample)
    also = {}
    for model in args.also:
        label = Path(model).name
        exports[label] = _export(model, work / f"{label}.gguf", "auto")
        llm = _llama(work / f"{label}.gguf", args.ctx, args.threads)
        also[label] = {"type": exports[label]["type"], "bytes": exports[label]["file_bytes"], "generated": _generate(llm)}
        print(f"{label}: {json.dumps(also[label])}", file=sys.stderr, flush=True)
    print(_table(results, ref_sizes))
    for label, r in also.items():
        print(f"{label} ({r['type']}, {r['bytes'] / 1e6:.1f} MB): {PROMPT!r} -> {r['generated'].strip()[:60]!r}")
    print(f"\n{args.windows} windows of {args.ctx} tokens, {results['f16 (llmopt)']['scored_tokens']} scored tokens; "
          f"llama.cpp tokenizes the sample like the HF tokenizer: "
          f"{all(r['tokenizer_matches_hf'] for r in results.values())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "also": also, "exports": exports}, indent=2) + "\n")


if __name__ == "__main__":
    main()
