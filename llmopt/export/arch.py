"""What llama.cpp expects of each architecture: its GGUF name, hyperparameter keys, tensor names and the
two places where its weights differ from Hugging Face's.

- LLaMA: llama.cpp rotates q and k in interleaved pairs, Hugging Face in halves, so the rows of q_proj
  and k_proj are reordered head by head (Qwen2 and Gemma3 rotate in halves in llama.cpp too: unchanged).
- Gemma3: Hugging Face's RMSNorm multiplies by (1 + w), llama.cpp's by w, so every norm weight gets 1 added.

Widths come from config.json, so pruned models (fewer heads or KV groups, a narrower MLP, the same in
every layer) export like any other; what llama.cpp would compute differently is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGUFWriter, MODEL_ARCH, MODEL_ARCH_NAMES, RopeScalingType, get_tensor_name_map

from llmopt.errors import UserError, require


@dataclass(frozen=True)
class Arch:
    arch: MODEL_ARCH
    activation: str            # the MLP activation llama.cpp hard-codes for it
    interleaved_rope: bool     # llama.cpp rotates pairs (2i, 2i+1): q/k rows reordered
    norm_shift: float          # added to every norm weight

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


ARCHS = {
    "llama": Arch(MODEL_ARCH.LLAMA, "silu", True, 0.0),
    "qwen2": Arch(MODEL_ARCH.QWEN2, "silu", False, 0.0),
    "gemma3_text": Arch(MODEL_ARCH.GEMMA3, "gelu_pytorch_tanh", False, 1.0),
}


def arch_for(config: dict) -> Arch:
    """The architecture of a config.json, after refusing what llama.cpp would run differently."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        hint = "export the text model (Gemma3ForCausalLM)" if model_type == "gemma3" else \
            f"supported: {', '.join(ARCHS)}"
        raise UserError(f"architecture '{model_type}' has no GGUF export in llmopt", hint=hint)
    arch = ARCHS[model_type]
    act = config.get("hidden_activation") or config.get("hidden_act")
    require(act == arch.activation, f"{model_type} with activation {act}: llama.cpp's {arch.name} computes "
            f"{arch.activation}", "export a model with the standard activation")
    if arch.arch == MODEL_ARCH.GEMMA3:
        scalar = config.get("query_pre_attn_scalar")
        require(scalar in (None, head_dim(config)), f"query_pre_attn_scalar {scalar} differs from head_dim "
                f"{head_dim(config)}, and llama.cpp's gemma3 scales attention by head_dim",
                "export a model whose query_pre_attn_scalar equals head_dim")
    kind = _rope(config)[1].get("rope_type", "default")
    require(kind in ("default", "linear", "llama3"), f"rope type '{kind}' has no GGUF export in llmopt",
            "supported rope types: default, linear, llama3")
    return arch


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope(config: dict, layer_type: str = "full_attention") -> tuple[float, dict]:
    """(theta, scaling parameters) from transformers 5's rope_parameters or the older rope_theta / rope_scaling."""
    params = config.get("rope_parameters") or {}
    if layer_type in params or "full_attention" in params:
        params = params.get(layer_type) or {}
    scaling = config.get("rope_scaling") or params
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), scaling


def add_hparams(writer: GGUFWriter, arch: Arch, config: dict) -> None:
    """The hyperparameters llama.cpp reads for `arch`."""
    hd = head_dim(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch.arch == MODEL_ARCH.GEMMA3:
        _gemma3_hparams(writer, config)


def _gemma3_hparams(writer: GGUFWriter, config: dict) -> None:
    """Sliding-window layers as a per-layer pattern, their own rope base, the final soft cap when set."""
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    types = config.get("layer_types")
    if config.get("sliding_window") and types and "sliding_attention" in types:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        writer.add_rope_freq_base_swa(_rope(config, "sliding_attention")[0])


def rope_freqs(config: dict) -> np.ndarray | None:
    """Llama 3's per-frequency rope factors (llama.cpp's rope_freqs tensor), or None for other rope types."""
    theta, s = _rope(config)
    if s.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    factors = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


class TensorNames:
    """Hugging Face tensor names -> GGUF tensor names, through gguf's own map for the architecture."""

    def __init__(self, arch: Arch, config: dict) -> None:
        self.arch = arch
        self.config = config
        self.map = get_tensor_name_map(arch.arch, int(config["num_hidden_layers"]))

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for tensors llama.cpp computes itself (rotary inverse frequencies)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no place in llama.cpp's {self.arch.name} architecture",
                            hint="the checkpoint holds weights this architecture does not have")
        return name

    def row_order(self, gguf_name: str) -> torch.Tensor | None:
        """The row permutation llama.cpp's interleaved rope needs for attn_q / attn_k (weights and biases)."""
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if not self.arch.interleaved_rope or kind not in ("attn_q", "attn_k"):
            return None
        heads = self.config["num_attention_heads"] if kind == "attn_q" else \
            self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
        half = head_dim(self.config) // 2
        return torch.arange(heads * 2 * half).view(heads, 2, half).transpose(1, 2).reshape(-1)

    def shift(self, gguf_name: str) -> float:
        return self.arch.norm_shift if gguf_name.endswith("norm.weight") else 0.0
