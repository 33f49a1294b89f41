"""The options of `llmopt quantize`, shared by the CLI and recipes so the two cannot drift."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmopt.errors import require

GPTQ_METHODS = ("gptq", "rtn", "int8")        # written in the GPTQ checkpoint layout
BNB_METHODS = ("llm-int8", "nf4", "fp4")      # through transformers' BitsAndBytesConfig
METHODS = GPTQ_METHODS + BNB_METHODS


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
    threshold: float = 6.0            # llm-int8 outlier threshold
    double_quant: bool = False        # nf4/fp4: quantize the quantization constants too
    compute_dtype: str = "bfloat16"   # nf4/fp4 compute dtype
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False

    def validate(self) -> None:
        """Checks shared by all methods; each method module adds its own."""
        require(self.method in METHODS, f"unknown --method '{self.method}'", f"use one of {', '.join(METHODS)}")
        require(bool(self.output), "no output directory given", "pass -o OUT")
