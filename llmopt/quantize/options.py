"""The options of `llmopt quantize`, shared by the CLI and recipes so the two cannot drift.

`QuantizeOptions.validate()` holds every check that needs only the options, for every method, so a
recipe's --dry-run refuses `bits: 5` before an hour of prune and distill. The checks that need the
model (a --skip pattern matching no Linear, --seq-len beyond its context, fused MoE experts) run in
the method modules as soon as the model's config is known, before any weights are read where possible.

`--skip` has one meaning for every method, implemented once here (`skip_matches`).
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields
from fnmatch import fnmatchcase

from llmopt.errors import UserError, require
from llmopt.quantize.packing import BITS as GPTQ_BITS

GPTQ_METHODS = ("gptq", "rtn", "int8")        # written in the GPTQ checkpoint layout
BNB_METHODS = ("llm-int8", "nf4", "fp4")      # through transformers' BitsAndBytesConfig
METHODS = GPTQ_METHODS + BNB_METHODS

BNB_BITS = {"llm-int8": 8, "nf4": 4, "fp4": 4}
GPTQ_ONLY = ("group_size", "sym", "desc_act", "true_sequential", "damp", "mse", "block_size", "calib",
             "nsamples", "seq_len", "seed")
FOUR_BIT_ONLY = ("double_quant", "compute_dtype")
COMPUTE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "half": "float16", "float32": "float32", "fp32": "float32"}

SKIP_HELP = ("Linear layers to keep in full precision (repeatable). A pattern matches a module's full "
             "dotted name exactly or as a dotted prefix (model.layers.1 is all of layer 1, not layers "
             "10-19) or suffix (down_proj, mlp.down_proj), with shell wildcards: *.down_proj, or "
             "layers.1[0-9] for layers 10-19. A pattern that matches no Linear is an error. Embeddings "
             "are always kept; the output head follows --lm-head.")
LM_HEAD_HELP = ("gptq/rtn/int8: also quantize the output head (lm_head): 8-bit with one scale per output "
                "channel below 8 bits, else the decoder's grid; GPTQ calibrates it on the final norm's "
                "outputs. A head tied to the input embeddings is untied in config.json and the embeddings "
                "written in full precision beside it (llmopt serves them from the quantized head). "
                "Off by default: transformers' own GPTQ loading (optimum) cannot read a quantized head and "
                "would run a random one, so only llmopt and GPTQModel load such a checkpoint. Not for "
                "bitsandbytes methods.")
# module names hold identifiers and dots; the rest are fnmatch wildcards
_SKIP_CHARS = re.compile(r"[\w.*?\[\]!-]+")


def skip_matches(name: str, patterns: list[str]) -> bool:
    """Whether a module's full dotted name matches a --skip pattern: the name or one of its dotted
    prefixes equals the pattern (glob), or ends with '.' + pattern. Dots are boundaries, so
    `model.layers.1` never reaches layer 10, and `mlp.gate` never reaches `mlp.gate_proj`."""
    parts = name.split(".")
    heads = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(h, p) or fnmatchcase(h, "*." + p) for p in patterns for h in heads)


def check_skip_matches(patterns: list[str], linears: list[str]) -> None:
    """Every --skip pattern must match at least one Linear of the model: a typo is not a no-op."""
    for pattern in patterns:
        if not any(skip_matches(n, [pattern]) for n in linears):
            shown = ", ".join(linears[-2:]) if linears else "(none)"
            raise UserError(f"--skip '{pattern}' matches no Linear layer of this model",
                            hint=f"Linear names look like {shown}")


def _default(name: str):
    f = next(f for f in fields(QuantizeOptions) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _refuse_changed(opts: QuantizeOptions, names: tuple[str, ...], where: str) -> None:
    """Options of another method must stay at their defaults: set, they would silently do nothing."""
    changed = [n for n in names if getattr(opts, n) != _default(n)]
    flags = ", ".join("--" + n.replace("_", "-") for n in changed)
    require(not changed, f"{flags} only appl{'ies' if len(changed) == 1 else 'y'} to {where}", f"drop {flags}")


@dataclass
class QuantizeOptions:
    model: str
    output: str
    method: str = "gptq"
    bits: int | None = None           # None: 4 for gptq/rtn, 8 for int8; not allowed with bitsandbytes methods
    group_size: int = 128             # -1 = one group per output channel
    sym: bool = True
    desc_act: bool = True             # act-order with static groups: better, and free at inference
    true_sequential: bool = True
    damp: float = 0.01
    mse: bool | None = None           # range search per group; None: on for gptq, off for rtn / int8
    block_size: int = 128
    calib: str = "auto"               # auto = wikitext2 when a data dir is set, else builtin
    nsamples: int = 128
    seq_len: int = 2048
    seed: int = 0
    skip: list[str] = field(default_factory=list)
    lm_head: bool = False             # off: a quantized head is read by llmopt and GPTQModel, not by transformers
    threshold: float = 6.0            # llm-int8 outlier threshold
    double_quant: bool = False        # nf4/fp4: quantize the quantization constants too
    compute_dtype: str = "bfloat16"   # nf4/fp4 compute dtype
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False

    @property
    def resolved_bits(self) -> int:
        """The width written: --bits, or the method's own (4 for gptq/rtn, 8 for int8 and llm-int8)."""
        if self.method in BNB_BITS:
            return BNB_BITS[self.method]
        return self.bits if self.bits is not None else (8 if self.method == "int8" else 4)

    @property
    def compute_dtype_name(self) -> str:
        return COMPUTE_DTYPES[str(self.compute_dtype).strip().lower()]

    def validate(self) -> None:
        """Every check that needs no model, for every method (see the module docstring)."""
        require(self.method in METHODS, f"unknown --method '{self.method}'", f"use one of {', '.join(METHODS)}")
        require(bool(self.output), "no output directory given", "pass -o OUT")
        for pattern in self.skip:
            require(bool(pattern and pattern.strip()), "--skip got an empty pattern",
                    "pass a module name such as model.layers.0.mlp or down_proj")
            require(bool(_SKIP_CHARS.fullmatch(pattern)), f"--skip '{pattern}' is not a module name pattern",
                    "use a dotted name with shell wildcards such as model.layers.1[0-9].* (not a regular "
                    "expression)")
        if self.method in BNB_METHODS:
            self._validate_bnb()
        else:
            self._validate_gptq()
        from llmopt.models import parse_device, parse_dtype

        parse_dtype(self.dtype, parse_device(self.device))

    def _validate_gptq(self) -> None:
        bits, g = self.resolved_bits, self.group_size
        require(bits in GPTQ_BITS, f"--bits must be one of 2, 3, 4, 8 for --method {self.method}, got {bits}")
        require(g == -1 or (g > 0 and g & (g - 1) == 0),
                f"--group-size must be a positive power of two or -1 (per channel), got {g}")
        if self.method == "int8":
            require(bits == 8, f"--method int8 is 8-bit, got --bits {bits}", "use --method gptq or rtn for other "
                    "widths")
            require(g in (-1, _default("group_size")),
                    "--method int8 has one scale per output channel; --group-size does not apply",
                    "drop --group-size, or use --method gptq/rtn --bits 8 --group-size N")
            require(self.sym, "--method int8 is symmetric", "use --method gptq/rtn --bits 8 --asym")
            require(self.mse is not True, "--method int8 keeps the full range", "use --method gptq/rtn --bits 8 "
                    "--mse")
        require(self.nsamples > 0, f"--nsamples must be positive, got {self.nsamples}")
        require(self.seq_len > 0, f"--seq-len must be positive, got {self.seq_len}")
        require(0 < self.damp < 1, f"--damp must be between 0 and 1 (exclusive), got {self.damp}",
                "transformers refuses a checkpoint whose damp_percent is not inside (0, 1)")
        require(self.block_size > 0, f"--block-size must be positive, got {self.block_size}")
        if self.method == "gptq":                  # the one method that reads calibration text
            from llmopt.data import check_source

            check_source(self.calib, "--calib", "calib", self.data_dir)
        _refuse_changed(self, FOUR_BIT_ONLY, "--method nf4/fp4")
        _refuse_changed(self, ("threshold",), "--method llm-int8")

    def _validate_bnb(self) -> None:
        method = self.method
        require(self.lm_head is not True, f"--lm-head does not apply to --method {method} (bitsandbytes keeps "
                "the output head in full precision)", "drop --lm-head, or use --method gptq/rtn/int8")
        require(self.bits is None, f"--bits does not apply to --method {method} (it is {BNB_BITS[method]}-bit by "
                "definition)", "drop --bits, or use --method gptq/rtn for another width")
        _refuse_changed(self, GPTQ_ONLY, f"gptq/rtn/int8, not to --method {method} (bitsandbytes needs no "
                        "calibration)")
        if method == "llm-int8":
            t = self.threshold
            require(isinstance(t, (int, float)) and math.isfinite(t) and t > 0,
                    f"--threshold must be a positive number, got {t}",
                    "6.0 is the LLM.int8 paper's value; larger keeps fewer outlier columns in float16")
            _refuse_changed(self, FOUR_BIT_ONLY, "--method nf4/fp4, not llm-int8")
        else:
            _refuse_changed(self, ("threshold",), f"--method llm-int8, not {method}")
            require(str(self.compute_dtype).strip().lower() in COMPUTE_DTYPES,
                    f"invalid --compute-dtype '{self.compute_dtype}'", "use bfloat16, float16 or float32")
