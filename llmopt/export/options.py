"""The options of `llmopt export`, defined once for the CLI and for library callers."""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.errors import require

TYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
TYPE_HELP = ("GGUF file type: auto (a GPTQ checkpoint's exact block mapping when it has one: symmetric 2-4 bit "
             "-> q4_0, asymmetric -> q4_1, 8-bit symmetric -> q8_0; an unquantized model -> bf16 if it is stored "
             "in bfloat16, else f16), f32, f16, bf16, q8_0, q4_0 or q4_1. Embeddings and output head get the "
             "types llama.cpp's own quantizer gives them. A conversion that is not exact says so and reports "
             "its error.")
# the bits per weight of each quantized GGUF type: a GPTQ checkpoint is never exported to fewer than its own
TYPE_BITS = {"q4_0": 4, "q4_1": 4, "q8_0": 8}


@dataclass
class ExportOptions:
    model: str
    output: str
    type: str = "auto"
    force: bool = False

    def validate(self) -> None:
        """The checks that need no model."""
        require(self.type in TYPES, f"unknown --type '{self.type}'", f"use one of {', '.join(TYPES)}")
        require(bool(self.output), "no output file given", "pass -o OUT.gguf")
        require(self.output.lower().endswith(".gguf"), f"output {self.output} does not end in .gguf",
                "name the output file NAME.gguf (llama.cpp's tools expect it)")
