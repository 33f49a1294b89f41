"""Write the GPTQModel-made fixtures under tests/data/ that tests/test_interop.py loads with llmopt.

llmopt's GPTQ runtime reads checkpoints in the standard layout. Checking it only against checkpoints
llmopt (or its tests) wrote would test our reading of the layout against itself, so these fixtures
are written by another tool, GPTQModel, with its own quantizer and packer, and carry reference
outputs computed by GPTQModel's own runtime.

Run with a separate environment that has GPTQModel (never part of CI or of llmopt's dependencies):

    python3 -m venv /path/to/gptqmodel-venv
    PIP_CONFIG_FILE=/dev/null /path/to/gptqmodel-venv/bin/pip install torch==2.15.0
    PIP_CONFIG_FILE=/dev/null /path/to/gptqmodel-venv/bin/pip install gptqmodel==7.7.0 optimum
    CUDA_VISIBLE_DEVICES= /path/to/gptqmodel-venv/bin/python benchmarks/gptqmodel_fixture.py

For each fixture (4-bit, group 32: symmetric with desc_act off and on, asymmetric with desc_act off) it:

1. builds a tiny random LLaMA (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
   vocab 128) from a config and saves it in float16 with a throwaway word-level tokenizer
   (GPTQModel's loader wants one; the fixture does not keep it);
2. quantizes it with GPTQModel on CPU (calibration: 8 random sequences of 32 tokens) and saves the
   checkpoint into tests/data/<name>/;
3. reloads that checkpoint with GPTQModel's torch backend (BACKEND.GPTQ_TORCH, TorchLinear) and
   writes tests/data/<name>.reference.safetensors beside the checkpoint directory (not
   inside: loaders read every *.safetensors there as weights), all computed by GPTQModel: `input_ids` [1, 16];
   `logits_fp16` [1, 16, 128], the model loaded in float16 as GPTQModel supports it; `logits`, the
   same in float32 (TorchLinear only lists float16/bfloat16, so the script adds float32 to that list
   while loading; its dequantize-then-matmul code is dtype-generic, and the scales are then float32,
   making its dequantized weights exact); and `weight.<module>` for two modules, TorchLinear's own
   dequantization [out, in] in the float16 model (float16 scales times integer codes, rounded to
   float16);
4. deletes the tokenizer files GPTQModel copied (llmopt loads the fixture with tokenizer=False).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# GPTQModel's loader pool wants 2 CPU workers; its default on a 2-core machine is 1, which it then refuses
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
OUT = Path(__file__).resolve().parent.parent / "tests" / "data"
VOCAB, SEQ = 128, 16
REFERENCE_MODULES = ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj")
# name: (desc_act, sym); symmetric zeros are one constant, so only the asymmetric one checks qzeros unpacking
FIXTURES = {"gptqmodel-g32-sym": (False, True), "gptqmodel-g32-sym-descact": (True, True),
            "gptqmodel-g32-asym": (False, False)}


def build_source(path: Path) -> None:
    """A random tiny LLaMA in float16 plus a word-level tokenizer over VOCAB tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.05, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(torch.float16)
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"t{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def quantize(source: Path, out: Path, desc_act: bool, sym: bool) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                   for ids in torch.randint(4, VOCAB, (8, 32), generator=gen).tolist()]
    qcfg = QuantizeConfig(bits=4, group_size=32, sym=sym, desc_act=desc_act, offload_to_disk=False)
    model = GPTQModel.load(str(source), qcfg, device="cpu", dtype=torch.float16)
    model.quantize(calibration, batch_size=1)
    model.save(str(out))


def _load(out: Path, dtype: torch.dtype):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    supported = list(TorchLinear.SUPPORTS_DTYPES)
    if dtype not in supported:   # its dequantize-and-matmul code is dtype-generic; only this list says no
        TorchLinear.SUPPORTS_DTYPES = supported + [dtype]
    try:
        model = GPTQModel.load(str(out), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=dtype)
    finally:
        TorchLinear.SUPPORTS_DTYPES = supported
    return model.model


def reference(out: Path) -> dict[str, torch.Tensor]:
    """input_ids, logits (float32 and float16) and dequantized weights from GPTQModel's torch backend."""
    ids = torch.randint(4, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    ref = {"input_ids": ids}
    models = {dtype: _load(out, dtype) for dtype in (torch.float32, torch.float16)}
    with torch.no_grad():
        ref["logits"] = models[torch.float32](input_ids=ids).logits.float().contiguous()
        ref["logits_fp16"] = models[torch.float16](input_ids=ids).logits.half().contiguous()
    for name in REFERENCE_MODULES:   # float16 scales, as GPTQModel runs by default
        module = models[torch.float16].get_submodule(name)
        ref[f"weight.{name}"] = module.dequantize_weight().t().contiguous()
    return ref


def main() -> None:
    import gptqmodel
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        build_source(source)
        for name, (desc_act, sym) in FIXTURES.items():
            out = OUT / name
            shutil.rmtree(out, ignore_errors=True)
            quantize(source, out, desc_act, sym)
            ref = reference(out)
            meta = {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "backend": "gptq_torch",
                    "command": "CUDA_VISIBLE_DEVICES= python benchmarks/gptqmodel_fixture.py"}
            save_file(ref, OUT / f"{name}.reference.safetensors", metadata=meta)
            for f in out.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
                    f.unlink()
            files = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
            print(f"{out}: {json.dumps(files)}", file=sys.stderr)


if __name__ == "__main__":
    main()
