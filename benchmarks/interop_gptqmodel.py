"""Do transformers and GPTQModel load llmopt's GPTQ checkpoints with their defaults, and compute what
llmopt's runtime computes?

Runs in an environment of its own with GPTQModel (never part of CI or of llmopt's dependencies),
with this checkout on PYTHONPATH:

    python3 -m venv /path/to/gptqmodel-venv
    PIP_CONFIG_FILE=/dev/null /path/to/gptqmodel-venv/bin/pip install torch==2.15.0
    PIP_CONFIG_FILE=/dev/null /path/to/gptqmodel-venv/bin/pip install gptqmodel==7.7.0 optimum
    CUDA_VISIBLE_DEVICES= GPTQMODEL_CPU_WORKERS=2 OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive \\
        LLMOPT_DATA=/path/to/wikitext-2-raw PYTHONPATH=. \\
        /path/to/gptqmodel-venv/bin/python benchmarks/interop_gptqmodel.py [--models ...] [--only LABEL ...]

For each model (SmolLM2-135M: input widths 576 and 1536; a random tiny Qwen2 built here: widths
160 and 480, q/k/v biases, SmolLM2's tokenizer) and each variant, `llmopt quantize` writes a
checkpoint with its defaults except the variant's options (GPTQ calibration: --nsamples 16
--seq-len 512 of wiki.valid), which is then loaded three ways:

- llmopt: `llmopt.models.load_model(path, device="cpu")` (its own runtime: float32, int4 / int8 kernels),
  and again with dtype="bfloat16";
- transformers: `AutoModelForCausalLM.from_pretrained(path, device_map="cpu")` (with optimum and
  gptqmodel installed; every other argument at its default);
- gptqmodel: `GPTQModel.load(path, device="cpu")` (kernel chosen by GPTQModel; it computes in bfloat16).

On the first 512-token window of wiki.test it reports, against llmopt's runtime (float32, its CPU
default), the mean per-token KL(P_llmopt || P_loader) and the top-1 agreement, and whether 32 greedy
tokens after a prompt are the same text; a loader passes at KL < 5e-3, top-1 >= 97% and the same
text. Both loaders compute these bfloat16 checkpoints in bfloat16, so the last column gives the
floor: llmopt's own runtime loaded with dtype="bfloat16" against its float32 (the JSON also holds
each loader against that bfloat16 run). A loader that raises, or that reports weights it did not
load (missing or unexpected keys), fails with its message.

The variant "partial g128" writes the layout llmopt wrote before it fitted the group size to the
input widths (a partial last group), to show what the loaders do with it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")   # its loader pool refuses 1 worker

KL_MAX, TOP1_MIN, NEW_TOKENS = 5e-3, 0.97, 32
HEAD_STD = 0.5
PROMPT = "The capital of France is Paris. The capital of Italy is"
VARIANTS: dict[str, dict] = {
    "gptq 4-bit sym act-order (default)": {},
    "gptq 4-bit sym no act-order": dict(desc_act=False),
    "gptq 4-bit asym (gptq_v2)": dict(sym=False),
    "gptq 3-bit": dict(bits=3),
    "gptq 8-bit": dict(bits=8),
    "gptq 4-bit per channel": dict(group_size=-1),
    "rtn 4-bit": dict(method="rtn"),
    "int8": dict(method="int8"),
    "gptq 4-bit --skip down_proj": dict(skip=["model.layers.1.mlp.down_proj"]),
    "gptq 4-bit --lm-head": dict(lm_head=True),
    "partial g128": dict(method="rtn", partial=True),
}


def tiny_qwen2(path: Path, tokenizer_dir: Path, head_std: float = HEAD_STD) -> None:
    """A random Qwen2 whose widths (160, 480) divide by 32 but not by 64 or 128, in bfloat16.

    Weights at transformers' default scale (0.02), q/k/v biases too, but the untied output head drawn
    with std `head_std`: at 0.02 every next-token distribution is near uniform over 49152 tokens and
    its top-1 a near-tie, while larger weights everywhere (0.2) make the model chaotic: either way
    llmopt's own bfloat16 and float32 runs already disagree on 4-9% of top-1 tokens."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=160, intermediate_size=480, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, head_std)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def quantize(model: str, out: Path, options: dict) -> dict:
    """llmopt quantize with the variant's options; "partial" turns off fitting the group size."""
    from llmopt.quantize import QuantizeOptions, pipeline, quantize as run

    options = dict(options)
    partial = options.pop("partial", False)
    opts = QuantizeOptions(model=model, output=str(out), calib="wikitext2", nsamples=16, seq_len=512, device="cpu",
                           force=True, **options)
    fit = pipeline.fit_group_size
    if partial:
        pipeline.fit_group_size = lambda requested, widths: (requested, None)
    try:
        return run(opts)
    finally:
        pipeline.fit_group_size = fit


def load_llmopt(path: Path, dtype: str = "float32"):
    from llmopt.models import load_model

    return load_model(str(path), device="cpu", dtype=dtype).model


def load_transformers(path: Path):
    """from_pretrained with its defaults; weights it reports as missing or unexpected are a failure."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError("; ".join(f"{k}: {sorted(v)[:3]}{' ...' if len(v) > 3 else ''}" for k, v in bad.items()))
    return model.eval()


def load_gptqmodel(path: Path):
    from gptqmodel import GPTQModel

    return GPTQModel.load(str(path), device="cpu").model.eval()


LOADERS = {"llmopt float32": load_llmopt, "llmopt bfloat16": lambda path: load_llmopt(path, "bfloat16"),
           "transformers": load_transformers, "gptqmodel": load_gptqmodel}


@torch.inference_mode()
def outputs(model, ids: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, list[int], str]:
    """float32 logits on `ids`, the greedy continuation of `prompt` and the dtype the model computes in."""
    logits = model(input_ids=ids).logits[0].float()
    gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                         do_sample=False, min_new_tokens=NEW_TOKENS)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return logits, gen[0, prompt.shape[1]:].tolist(), str(dtype).removeprefix("torch.")


def agreement(ref: tuple, got: tuple) -> dict:
    """Mean KL(P_ref || P_got) per token and top-1 agreement."""
    p = F.log_softmax(ref[0], -1)
    return {"kl": float((p.exp() * (p - F.log_softmax(got[0], -1))).sum(-1).mean()),
            "top1": float((ref[0].argmax(-1) == got[0].argmax(-1)).float().mean())}


def compare(refs: dict, got: tuple, tokenizer) -> dict:
    """Against llmopt in the dtype the loader computes in, and against llmopt's float32 default (what
    the verdict uses); the loader's greedy text."""
    ref = refs.get(got[2], refs["float32"])
    same = tokenizer.decode(got[1]) == tokenizer.decode(ref[1])
    return {"dtype": got[2], **agreement(ref, got), "same_text": same, "text": tokenizer.decode(got[1]),
            "vs_float32": agreement(refs["float32"], got)}


def verdict(row: dict, r: dict) -> bool:
    """KL and top-1 against llmopt's float32 runtime, greedy text equal to its text."""
    f32 = r["vs_float32"]
    return f32["kl"] < KL_MAX and f32["top1"] >= TOP1_MIN and r["text"] == row["llmopt_text"]


def run_loader(name: str, path: Path, ids, prompt) -> tuple | str:
    """The loader's outputs, or its error in one line (its own chatter is swallowed)."""
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = LOADERS[name](path)
        out = outputs(model, ids, prompt)
    except Exception as e:           # noqa: BLE001 - a loader's refusal is the measurement
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        gc.collect()
    print(f"    {name}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return out


def run_variant(model: str, label: str, work: Path, ids, prompt, tokenizer) -> dict:
    out = work / label.replace(" ", "_").replace("/", "")
    summary = quantize(model, out, VARIANTS[label])
    row = {"bits": summary["bits"], "group_size": summary["group_size"], "format": summary["format"],
           "desc_act": summary["desc_act"], "lm_head": VARIANTS[label].get("lm_head", False)}
    refs = {}
    for dtype in ("float32", "bfloat16"):
        ref = run_loader(f"llmopt {dtype}", out, ids, prompt)
        if isinstance(ref, str):
            return {**row, "llmopt": ref}
        refs[dtype] = ref
    row["llmopt_text"] = tokenizer.decode(refs["float32"][1])
    row["llmopt_bf16_vs_float32"] = agreement(refs["float32"], refs["bfloat16"])
    for name in ("transformers", "gptqmodel"):
        got = run_loader(name, out, ids, prompt)
        row[name] = got if isinstance(got, str) else compare(refs, got, tokenizer)
    return row


def cell(row: dict, r) -> str:
    """A loader's figures against llmopt's float32 runtime, each one that misses its bar in bold."""
    if isinstance(r, str):
        return f"fails: {r}"
    f32, same = r["vs_float32"], r["text"] == row["llmopt_text"]
    kl, top1, text = f"{f32['kl']:.1e}", f"{100 * f32['top1']:.1f}%", "same" if same else "differs"
    bold = {"kl": f32["kl"] >= KL_MAX, "top1": f32["top1"] < TOP1_MIN, "text": not same}
    kl, top1, text = (f"**{v}**" if bold[k] else v for k, v in (("kl", kl), ("top1", top1), ("text", text)))
    return f"{'ok' if verdict(row, r) else 'loads'}: KL {kl}, top-1 {top1}, text {text}"


def markdown(results: dict) -> str:
    lines = ["| model | variant | group | format | transformers | GPTQModel | llmopt bfloat16 |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for label, r in rows.items():
            floor = r.get("llmopt_bf16_vs_float32")
            floor = f"KL {floor['kl']:.1e}, top-1 {100 * floor['top1']:.1f}%" if floor else ""
            lines.append(f"| {model} | {label} | {r['group_size']} | {r['format']} | "
                         f"{cell(r, r.get('transformers', r.get('llmopt')))} | "
                         f"{cell(r, r.get('gptqmodel', r.get('llmopt')))} | {floor} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "tiny-qwen2"])
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), metavar="LABEL")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--table", default=None, help="only print the table of a JSON that --json wrote")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    import gptqmodel
    import transformers

    from llmopt.data import text_windows
    from llmopt.models import local_dir

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, transformers "
          f"{transformers.__version__}, gptqmodel {gptqmodel.__version__}, {torch.get_num_threads()} threads; "
          f"python {' '.join(sys.argv)}", flush=True)
    smol = local_dir("smollm2-135m").path
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="interop-") as tmp:
        work = Path(tmp)
        for model in args.models:
            path = str(smol) if model == "smollm2-135m" else str(work / model)
            if model == "tiny-qwen2":
                tiny_qwen2(work / model, smol)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            ids, _ = text_windows(tok, "wikitext2", "eval", 512, max_windows=1)
            prompt = tok(PROMPT, return_tensors="pt").input_ids
            results[model] = {}
            for label in args.only or VARIANTS:
                print(f"{model} / {label}", file=sys.stderr, flush=True)
                r = run_variant(path, label, work, ids[:1], prompt, tok)
                results[model][label] = r
                print(f"{model} | {label} | {json.dumps(r, default=str)}", flush=True)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
