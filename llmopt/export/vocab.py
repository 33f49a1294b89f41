"""A Hugging Face tokenizer.json as GGUF tokenizer metadata, in the two forms llama.cpp reads.

- Byte-level BPE without byte fallback (GPT-2 style: SmolLM2, Llama 3, Qwen2) -> model `gpt2`:
  tokens, token types, merges, and `pre`, the name llama.cpp gives the pre-tokenizer's split rule
  (read from the pre-tokenizer itself; a rule llama.cpp has no name for is refused, since llama.cpp
  would split text differently from the model's own tokenizer).
- BPE with byte fallback or Unigram (SentencePiece style: Gemma, Llama 2) -> model `llama`: tokens,
  scores and types. llama.cpp merges the adjacent pair whose merged token scores highest, so a BPE
  token scores minus the rank of the merge that makes it, which replays the BPE merge order.

Special tokens, add-BOS/EOS flags and the chat template come from gguf's SpecialVocab.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from llmopt.errors import UserError

# the split rules of the pre-tokenizers llama.cpp names (the regex in tokenizer.json, verbatim)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_NAMES = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_vocab(writer: GGUFWriter, path: Path, n_vocab: int) -> dict:
    """Write the tokenizer of the model directory `path`, padded to the embedding's `n_vocab` rows."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path} has no tokenizer.json", hint="save the model's fast tokenizer beside it "
                                                              "(AutoTokenizer.from_pretrained(...).save_pretrained)")
    tj = json.loads(file.read_text(encoding="utf-8"))
    model = tj["model"]
    tokens, added = _tokens(tj, n_vocab)
    beyond = sorted(a["content"] for i, a in added.items() if i >= n_vocab)
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if model["type"] == "BPE" and not model.get("byte_fallback") and byte_level:
        kind, pre = "gpt2", _pre_name(tj.get("pre_tokenizer"))
        types = [_type(i, t, added, spm=False) for i, t in enumerate(tokens)]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    elif model["type"] in ("BPE", "Unigram"):
        kind, pre = "llama", "default"
        scores = _scores(model, tokens)
        types = [_type(i, t, added, spm=True) for i, t in enumerate(tokens)]
        tokens = [t.replace("\u2581", " ") if types[i] == TokenType.USER_DEFINED else t for i, t in enumerate(tokens)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_prepends_space(tj.get("normalizer")))
    else:
        raise UserError(f"{file}: a {model['type']} tokenizer has no GGUF form llmopt writes",
                        hint="llmopt exports byte-level BPE, byte-fallback BPE and Unigram tokenizers")
    gguf_logger = logging.getLogger("gguf")
    level, gguf_logger.level = gguf_logger.level, logging.ERROR
    try:
        SpecialVocab(path, load_merges=False, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    finally:
        gguf_logger.setLevel(level)
    return {"model": kind, "pre": pre, "tokens": len(tokens), "dropped": beyond}


def _tokens(tj: dict, n_vocab: int) -> tuple[list[str], dict[int, dict]]:
    """Token strings by id for the embedding's rows (ids the tokenizer leaves unused become [PADi]; added
    tokens beyond the rows are left out, as the model has no embedding for them) and the added tokens by id."""
    vocab = tj["model"]["vocab"]
    by_id = {i: piece for i, (piece, _) in enumerate(vocab)} if isinstance(vocab, list) \
        else {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    return [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)], added


def _type(i: int, token: str, added: dict[int, dict], spm: bool) -> TokenType:
    if token == f"[PAD{i}]":
        return TokenType.UNUSED
    if i in added:
        return TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED
    if spm and _BYTE.fullmatch(token):
        return TokenType.BYTE
    return TokenType.NORMAL


def _scores(model: dict, tokens: list[str]) -> list[float]:
    """Unigram: its own log-probabilities. BPE: minus the rank of the first merge that makes each token."""
    if model["type"] == "Unigram":
        own = [float(score) for _, score in model["vocab"]]
        return own + [0.0] * (len(tokens) - len(own))
    vocab = model["vocab"]
    scores = [0.0] * len(tokens)
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i < len(scores) and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return scores


def _prepends_space(normalizer: dict | None) -> bool:
    """Whether the normalizer puts '▁' before the text (SentencePiece's add_dummy_prefix)."""
    if not normalizer:
        return False
    steps = normalizer.get("normalizers", [normalizer])
    return any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps)


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from its structure."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise UserError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
                        "llama.cpp knows by name, so llama.cpp would split text differently",
                        hint="llmopt exports GPT-2, SmolLM, Llama 3 and Qwen2 byte-level pre-tokenizers")
    return name
