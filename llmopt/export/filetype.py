"""Which GGML type each tensor gets: the file type asked for (or the one `auto` picks for the checkpoint), with
the per-tensor exceptions llama.cpp's own quantizer makes, so that file sizes compare fairly with its output."""

from __future__ import annotations

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from llmopt.errors import UserError
from llmopt.export.blocks import QK
from llmopt.export.options import TYPE_BITS
from llmopt.export.source import Checkpoint

GGML = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
              "q4_1": LlamaFileType.MOSTLY_Q4_1}
QK_K = 256   # the super-block of llama.cpp's k-quants (Q6_K)


def file_type(asked: str, ckpt: Checkpoint) -> str:
    """The file type for `--type asked`: auto picks the GPTQ grid's exact counterpart, or the stored
    16-bit type of an unquantized model; a type coarser than a GPTQ checkpoint's own grid is refused."""
    q = ckpt.gptq
    if asked == "auto":
        if q is None:
            return "bf16" if ckpt.stored_dtype() == "BF16" else "f16"
        if int(q["bits"]) <= 4:
            return "q4_0" if q.get("sym", True) else "q4_1"
        return "q8_0"
    if q is not None and asked in TYPE_BITS and TYPE_BITS[asked] < int(q["bits"]):
        raise UserError(f"a {q['bits']}-bit GPTQ checkpoint cannot map to {asked} ({TYPE_BITS[asked]} bits per "
                        "weight) without losing what GPTQ kept",
                        hint=f"export it as q8_0, f16 or auto, or quantize the original to {TYPE_BITS[asked]} bits")
    return asked


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, tied: bool) -> tuple[T, str | None]:
    """The GGML type of one tensor (shape in PyTorch order, rows first) and why, when it is not the file's type.

    As llama.cpp's quantizer does: 1-D tensors and norms stay F32; the output head (the token embedding
    when tied) is Q8_0 below 8 bits where its width is not a multiple of 256, else Q6_K, which llmopt
    cannot write, so Q8_0 with a note; a row width that is not a multiple of 32 falls back to F16."""
    if len(shape) < 2 or name.endswith("norm.weight"):
        return T.F32, None
    target = GGML[ftype]
    if target in (T.F32, T.F16, T.BF16):
        return target, None
    cols, note = shape[-1], None
    if ftype in ("q4_0", "q4_1") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        target = T.Q8_0
        if cols % QK_K == 0:
            note = "Q8_0 where llama.cpp's quantizer writes Q6_K (llmopt does not write k-quants)"
    if cols % QK:
        return T.F16, f"rows of {cols} are not a multiple of {QK}, so F16 (as llama.cpp does)"
    return target, note
