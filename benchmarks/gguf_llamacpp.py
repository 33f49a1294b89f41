"""llmopt's GGUF exports run in llama.cpp (through llama-cpp-python; not used by the tests):

- every exported file loads, and SmolLM2 greedy-completes "The capital of France is" with "Paris";
- a GPTQ w4 g32 checkpoint exported as Q4_0 (its own codes) against llama.cpp's own Q4_0 of the same
  original (llama.cpp's quantizer, `llama_model_quantize`, run on llmopt's f16 export), and the same for
  an asymmetric checkpoint as Q4_1: WikiText-2 test perplexity, KL divergence and top-1 agreement against
  the f16 export, file sizes.

    pip install 'llmopt[llamacpp]'
    llmopt quantize smollm2-135m -o out/g32 --group-size 32 --nsamples 64 --seq-len 512 --calib wikitext2
    llmopt quantize smollm2-135m -o out/g32a --group-size 32 --asym --nsamples 64 --seq-len 512 --calib wikitext2
    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw python benchmarks/gguf_llamacpp.py \\
        --model smollm2-135m --gptq out/g32 --gptq-asym out/g32a [--also gemma3-270m out/pruned] [--windows 8]

Evaluation: the first --windows non-overlapping --ctx-token windows of WikiText-2 test, cut by llmopt's
own loader (`llmopt.data.load_windows`, as `llmopt bench` cuts them: rows joined with blank lines, BOS
first when the tokenizer adds one, as llama.cpp's perplexity does), so every file sees the same token
ids; each window is one llama.cpp evaluation with all logits kept, and every target after the first is
scored. Beside them, each f16 / auto export against the Hugging Face model in float32 on its first 128
tokens: the check that names, row orders, norms and hyperparameters mean in llama.cpp what they meant.
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
    """The file in llama.cpp behind the forward `llmopt bench` calls (`llmopt.bench.llamacpp.LlamaCppLM`)."""
    from llmopt.bench.llamacpp import load_llamacpp

    return load_llamacpp(path, ctx, tokenizer=False, threads=threads).model


def _reference_quantize(f16: Path, out: Path, ftype: str) -> None:
    """llama.cpp's own quantizer on llmopt's f16 export (the default mixture, no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
                    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[ftype]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16}")


def _windows(model_dir: Path, data_dir: Path, n: int, ctx: int):
    """llmopt's own evaluation windows (as `llmopt bench` cuts them: BOS first when the tokenizer adds one)."""
    from transformers import AutoTokenizer

    from llmopt.data import load_windows

    return load_windows(AutoTokenizer.from_pretrained(model_dir), "wikitext2", "eval", ctx, max_windows=n,
                        directory=data_dir)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logprobs(llm, window: list[int]) -> np.ndarray:
    """Every position's log-probabilities, the window evaluated from an empty KV cache."""
    import torch

    return _log_softmax(llm(torch.tensor([window])).logits[0].numpy())


def _generate(llm) -> str:
    out = llm.llm(PROMPT, max_tokens=12, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def evaluate(files: dict[str, Path], reference: str, windows, ctx: int, threads: int, sample: str,
             hf_ids: list[int]) -> dict[str, dict]:
    """Perplexity, KL(reference || file) and top-1 agreement, window by window with every file loaded.
    Targets from `windows.first_target` on are scored (not the prediction from a BOS alone)."""
    llms = {label: _llama(path, ctx, threads) for label, path in files.items()}
    stats = {label: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for label in files}
    first = windows.first_target
    for row in windows.ids.tolist():
        ref = _logprobs(llms[reference], row)[first - 1:-1]
        targets = np.array(row[first:])
        for label, llm in llms.items():
            lp = ref if label == reference else _logprobs(llm, row)[first - 1:-1]
            s = stats[label]
            s["nll"] -= float(lp[np.arange(len(targets)), targets].sum())
            s["kl"] += float((np.exp(ref) * (ref - lp)).sum())
            s["top1"] += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            s["n"] += len(targets)
    results = {}
    for label, llm in llms.items():
        s = stats[label]
        results[label] = {"file": str(files[label]), "bytes": files[label].stat().st_size,
                          "ppl": math.exp(s["nll"] / s["n"]), "kl": s["kl"] / s["n"], "top1": s["top1"] / s["n"],
                          "generated": _generate(llm), "scored_tokens": s["n"],
                          "tokenizer_matches_hf": llm.llm.tokenize(sample.encode(), add_bos=False, special=False) == hf_ids}
        print(f"{label}: {json.dumps(results[label])}", file=sys.stderr, flush=True)
    return results


def hf_agreement(model: str, gguf: Path, text: str, threads: int, n: int = 128) -> dict:
    """KL(Hugging Face float32 || llama.cpp on the GGUF file) and top-1 agreement on the first `n` tokens of
    `text`: the check that names, row orders, norms and hyperparameters mean in llama.cpp what they meant."""
    import torch
    from transformers import AutoTokenizer

    from llmopt.models import load_model, local_dir

    ids = AutoTokenizer.from_pretrained(local_dir(model).path)(text)["input_ids"][:n]
    hf_model = load_model(model, device="cpu", dtype="float32", tokenizer=False).model
    with torch.no_grad():
        hf = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    del hf_model
    lp = _logprobs(_llama(gguf, max(n, 128), threads), ids)
    kl = float((np.exp(hf) * (hf - lp)).sum(-1).mean())
    return {"tokens": len(ids), "kl_hf_vs_gguf": kl, "top1_hf_vs_gguf": float((hf.argmax(-1) == lp.argmax(-1)).mean())}


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    from transformers import AutoTokenizer

    model_dir = local_dir(args.model).path
    windows = _windows(model_dir, data, args.windows, args.ctx)
    sample = (data / "wiki.test.raw").read_text(encoding="utf-8")[:2000]
    hf_ids = AutoTokenizer.from_pretrained(model_dir)(sample, add_special_tokens=False)["input_ids"]
    results = evaluate(files, "f16 (llmopt)", windows, args.ctx, args.threads, sample, hf_ids)
    also = {Path(args.model).name + " f16": hf_agreement(args.model, work / "f16.gguf", sample, args.threads)}
    also[Path(args.model).name + " f16"].update(type="f16", bytes=files["f16 (llmopt)"].stat().st_size,
                                                generated=results["f16 (llmopt)"]["generated"])
    for model in args.also:
        label = Path(model).name
        exports[label] = _export(model, work / f"{label}.gguf", "auto")
        llm = _llama(work / f"{label}.gguf", args.ctx, args.threads)
        also[label] = {"type": exports[label]["type"], "bytes": exports[label]["file_bytes"], "generated": _generate(llm),
                       **hf_agreement(model, work / f"{label}.gguf", sample, args.threads)}
        print(f"{label}: {json.dumps(also[label])}", file=sys.stderr, flush=True)
    print(_table(results, ref_sizes))
    print("\n| model | type | size MB | KL(HF float32 vs llama.cpp) | top-1 agreement | greedy completion |\n"
          "| --- | --- | ---: | ---: | ---: | --- |")
    for label, r in also.items():
        print(f"| {label} | {r['type']} | {r['bytes'] / 1e6:.1f} | {r['kl_hf_vs_gguf']:.1e} | "
              f"{r['top1_hf_vs_gguf']:.2%} | {r['generated'].strip()[:40]!r} |")
    print(f"\n{args.windows} windows of {args.ctx} tokens, {results['f16 (llmopt)']['scored_tokens']} scored tokens; "
          f"llama.cpp tokenizes the sample like the HF tokenizer: "
          f"{all(r['tokenizer_matches_hf'] for r in results.values())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "also": also, "exports": exports}, indent=2) + "\n")


if __name__ == "__main__":
    main()
