"""LLM.int8, NF4 and FP4 through bitsandbytes, applied by transformers' `BitsAndBytesConfig`.

Going through transformers keeps the output in the one layout bitsandbytes users already load:
`AutoModelForCausalLM.from_pretrained(out)` works with bitsandbytes installed and no llmopt.
There is no calibration: each weight is quantized on its own while it is loaded (row-wise int8
for LLM.int8, 64-weight blocks for NF4/FP4), so the work here is choosing what to quantize,
refusing combinations that cannot mean anything, and measuring what the rounding cost.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from llmopt.checkpoint import check_output, dir_size, provenance, save_pretrained
from llmopt.errors import MissingExtra, UserError, require
from llmopt.progress import SILENT, Progress
from llmopt.quantize.options import QuantizeOptions

GPTQ_ONLY = ("group_size", "sym", "desc_act", "true_sequential", "damp", "mse", "block_size", "calib",
             "nsamples", "seq_len", "seed")
INT8_ONLY = ("threshold",)
FOUR_BIT_ONLY = ("double_quant", "compute_dtype")
COMPUTE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "half": "float16", "float32": "float32", "fp32": "float32"}
BITS = {"llm-int8": 8, "nf4": 4, "fp4": 4}

# bitsandbytes' CPU 4-bit kernel repacks each weight in 64-column blocks of 32-row tiles; other shapes
# quantize fine but crash at the first forward pass on CPU.
CPU_4BIT_IN_MULTIPLE, CPU_4BIT_OUT_MULTIPLE = 64, 32

# Loggers that speak on every forward pass (LLM.int8 casting activations to float16, which is how the
# method works) or at import (an optional hub kernel that offline machines cannot fetch).
_CHATTY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call warnings; they say nothing a user can act on."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def require_bitsandbytes(purpose: str = "--method llm-int8/nf4/fp4"):
    """Import bitsandbytes or say exactly how to install it."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingExtra("bitsandbytes", "bnb", purpose) from e
    except Exception as e:  # noqa: BLE001 - a broken native library is the user's to fix, not a crash
        raise UserError(f"bitsandbytes is installed but failed to load: {type(e).__name__}: {e}",
                        hint="reinstall it: pip install --force-reinstall 'llmopt[bnb]'") from e
    return bitsandbytes


def _default(name: str):
    f = next(f for f in fields(QuantizeOptions) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_bnb(opts: QuantizeOptions) -> None:
    """The bitsandbytes-specific checks; everything here fails before any file is read."""
    method = opts.method
    require(opts.bits is None, f"--bits does not apply to --method {method} (it is {BITS[method]}-bit by "
            "definition)", "drop --bits, or use --method gptq/rtn for another width")
    changed = [f for f in GPTQ_ONLY if getattr(opts, f) != _default(f)]
    require(not changed, f"{', '.join(_flag(f) for f in changed)} only appl{'ies' if len(changed) == 1 else 'y'} "
            f"to gptq/rtn/int8, not to --method {method} (bitsandbytes needs no calibration)",
            f"drop {', '.join(_flag(f) for f in changed)}")
    if method == "llm-int8":
        t = opts.threshold
        require(isinstance(t, (int, float)) and math.isfinite(t) and t > 0,
                f"--threshold must be a positive number, got {t}",
                "6.0 is the LLM.int8 paper's value; larger keeps fewer outlier columns in float16")
        wrong = [f for f in FOUR_BIT_ONLY if getattr(opts, f) != _default(f)]
        require(not wrong, f"{', '.join(_flag(f) for f in wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} "
                "to --method nf4/fp4, not llm-int8", f"drop {', '.join(_flag(f) for f in wrong)}")
    else:
        require(opts.threshold == _default("threshold"), f"--threshold only applies to --method llm-int8, "
                f"not {method}", "drop --threshold")
        require(str(opts.compute_dtype).strip().lower() in COMPUTE_DTYPES,
                f"invalid --compute-dtype '{opts.compute_dtype}'", "use bfloat16, float16 or float32")
    for pattern in opts.skip:
        require(bool(pattern and pattern.strip()), "--skip got an empty pattern", "pass a module name such as "
                "lm_head or model.layers.0.mlp")
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"--skip '{pattern}' is not a valid pattern: {e}",
                            hint="pass a module name or a regular expression such as 'model.layers.0.*'") from e


def bnb_config(opts: QuantizeOptions, skip_modules: list[str]):
    """The transformers `BitsAndBytesConfig` for these options (also what config.json records)."""
    from transformers import BitsAndBytesConfig

    if opts.method == "llm-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts.threshold),
                                  llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.method,
                              bnb_4bit_use_double_quant=bool(opts.double_quant),
                              bnb_4bit_compute_dtype=COMPUTE_DTYPES[opts.compute_dtype.strip().lower()],
                              llm_int8_skip_modules=skip_modules)


def plan_modules(meta_model: torch.nn.Module, skip: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the model's Linear layers into (quantized, kept) the way transformers will, plus the full
    skip list: the output head (kept, like the embeddings) and the user's patterns."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    head = meta_model.get_output_embeddings()
    keep = sorted({name for name, m in meta_model.named_modules() if head is not None and m is head})
    linears = {name: m for name, m in meta_model.named_modules() if type(m) is torch.nn.Linear}
    for pattern in skip:
        if all(should_convert_module(name, [pattern]) for name in linears):
            raise UserError(f"--skip '{pattern}' matches no Linear layer of this model",
                            hint=f"layer names look like {_example(linears)}")
    skip_all = keep + [p for p in skip if p not in keep]
    quantized = [n for n in linears if should_convert_module(n, skip_all)]
    kept = [n for n in linears if n not in quantized]
    return quantized, kept, skip_all


def _example(linears: dict) -> str:
    names = list(linears)
    return ", ".join(names[:2]) if names else "(none)"


def check_cpu_shapes(meta_model: torch.nn.Module, quantized: list[str]) -> None:
    """Refuse 4-bit layers that bitsandbytes' CPU kernel cannot run, before spending any time on them."""
    modules = dict(meta_model.named_modules())
    bad = [n for n in quantized if modules[n].in_features % CPU_4BIT_IN_MULTIPLE
           or modules[n].out_features % CPU_4BIT_OUT_MULTIPLE]
    if bad:
        shown = ", ".join(f"{n} ({modules[n].in_features}->{modules[n].out_features})" for n in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"bitsandbytes' CPU 4-bit kernel needs input widths divisible by {CPU_4BIT_IN_MULTIPLE} "
                        f"and output widths by {CPU_4BIT_OUT_MULTIPLE}; {shown}{more} are not",
                        hint="keep them in full precision with --skip NAME, use --method llm-int8, or quantize "
                             "on CUDA with --device cuda")


def _source_dir(opts: QuantizeOptions, progress: Progress, workdir: Path) -> tuple[str, dict]:
    """A from_pretrained-able location of the full-precision model, and its config as a dict."""
    from llmopt.models import check_causal, load_model, local_dir, quant_method, read_config

    source = local_dir(opts.model, progress)
    if source.kind == "hub":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.hub_id).to_dict()
        except (OSError, ValueError) as e:
            raise UserError(f"could not fetch '{source.hub_id}' from the Hugging Face hub",
                            hint="check the id and your network, or pass a local directory") from e
        where = source.hub_id
    elif source.kind == "gguf":
        # bitsandbytes quantizes while loading a standard checkpoint: dequantize the GGUF into one first.
        loaded = load_model(opts.model, device="cpu", dtype="float32", progress=progress)
        where = str(workdir / "source")
        loaded.model.save_pretrained(where)
        loaded.tokenizer.save_pretrained(where)
        del loaded
        config = read_config(Path(where))
    else:
        where = str(source.path)
        config = read_config(source.path)
    check_causal(config, opts.model)
    method = quant_method(config)
    if method is not None:
        raise UserError(f"{opts.model} is already quantized ({method})",
                        hint="quantize from the full-precision model")
    return where, config


def _meta_model(where: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _weight_files(where: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local checkpoint (empty for hub ids)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []:
        with safe_open(f, "pt") as st:
            index.update({k: f for k in st.keys()})
    return index


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The float32 weight a bitsandbytes layer computes with (None for other layers)."""
    import bitsandbytes.functional as F

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return F.dequantize_4bit(weight.data, state).float()
    if weight is not None and weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None and getattr(module, "state", None) is not None:
            scb = module.state.SCB
        if scb is not None:
            return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return None


@torch.no_grad()
def weight_errors(model: torch.nn.Module, where: str, quantized: list[str]) -> dict:
    """Relative Frobenius error ||W_q - W|| / ||W|| of each quantized weight against the source file."""
    from safetensors import safe_open

    files = _weight_files(where)
    modules = dict(model.named_modules())
    errors: dict[str, float] = {}
    for name in quantized:
        key = f"{name}.weight"
        if key not in files or name not in modules:
            continue
        deq = dequantized_weight(modules[name])
        if deq is None:
            continue
        with safe_open(files[key], "pt") as st:
            ref = st.get_tensor(key).float()
        if ref.shape != deq.shape:
            continue
        errors[name] = ((deq.cpu() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if not errors:
        return {}
    values = list(errors.values())
    worst = max(errors, key=errors.get)
    return {"weight_rel_error_mean": round(sum(values) / len(values), 6),
            "weight_rel_error_max": round(errors[worst], 6), "weight_rel_error_worst_layer": worst,
            "weight_rel_error_layers": len(values)}


def quantize_bnb(opts: QuantizeOptions, progress: Progress = SILENT) -> dict:
    """`llmopt quantize --method llm-int8|nf4|fp4`: quantize while loading, save in transformers' layout."""
    from llmopt.info import count_parameters, weight_bytes
    from llmopt.models import parse_device, parse_dtype

    started = time.time()
    opts.validate()
    validate_bnb(opts)
    device = parse_device(opts.device)
    dtype = parse_dtype(opts.dtype, device)
    out = check_output(opts.output, opts.force)
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.src-", dir=out.absolute().parent) as work:
        where, _ = _source_dir(opts, progress, Path(work))
        meta = _meta_model(where)
        quantized, kept, skip_all = plan_modules(meta, opts.skip)
        require(bool(quantized), "no Linear layer is left to quantize", "match fewer layers with --skip")
        if BITS[opts.method] == 4 and device.type == "cpu":
            check_cpu_shapes(meta, quantized)
        del meta
        config = bnb_config(opts, skip_all)
        progress.start(f"Quantizing {opts.model} with bitsandbytes {opts.method} ({len(quantized)} layers)",
                       total=None)
        placement = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
        model = AutoModelForCausalLM.from_pretrained(where, quantization_config=config, dtype=dtype,
                                                     device_map=placement).eval()
        tokenizer = AutoTokenizer.from_pretrained(where)
        progress.finish()
        progress.start("Measuring weight error against the source", total=None)
        errors = weight_errors(model, where, quantized)
        progress.finish()

    params = count_parameters(model)
    mem = weight_bytes(model)
    metrics = {
        "quantized_layers": len(quantized),
        "kept_layers": kept,
        "parameters": params,
        "weight_bytes": mem,
        "bits_per_weight": round(8 * mem / params, 3) if params else None,
        **errors,
    }
    settings = {"method": opts.method, "bits": BITS[opts.method], "skip_modules": skip_all,
                "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    if opts.method == "llm-int8":
        settings["threshold"] = float(opts.threshold)
    else:
        settings.update(double_quant=bool(opts.double_quant),
                        compute_dtype=COMPUTE_DTYPES[opts.compute_dtype.strip().lower()])
    record = provenance("quantize", opts.model, opts, started, metrics=metrics, quantization=settings)
    progress.start(f"Writing {out}", total=None)
    save_pretrained(model, tokenizer, out, opts.force, record)
    progress.finish()
    return {"output": str(out), **settings, **metrics, "disk_bytes": dir_size(out),
            "wall_time_s": round(time.time() - started, 3)}
