"""Text sources and the token windows cut from them for calibration, evaluation and training.

Sources (the `--calib`, `--ppl-data` and `--data` values):

- `wikitext2`: WikiText-2 raw. Read from `--data-dir` / `$LLMOPT_DATA` (a folder holding
  `wiki.test.raw`, `wiki.valid.raw` and optionally `wiki.train.raw`) or, when online, through the
  `datasets` library. Evaluation uses the test split; calibration uses train when present, else
  validation (never test).
- `c4`: the first C4 validation shard through `datasets` (online only).
- `builtin`: Python's own reference documentation (`pydoc_data.topics`), present wherever Python
  is, so the offline quickstart always has real English text. Calibration uses its first three
  quarters, evaluation the last quarter.
- `auto` (the default everywhere): wikitext2 when a data directory holding `wiki.test.raw` is
  configured, else builtin. Reports record which source was actually read.
- a path to a `.txt`/`.raw` file (used as is) or a `.jsonl` file (its `"text"` fields).

Evaluation follows the GPTQ paper's convention: the split's rows joined with "\\n\\n", tokenized
once, cut into non-overlapping windows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.errors import MissingExtra, UserError

NAMED_SOURCES = ("wikitext2", "c4", "builtin")


@dataclass
class Text:
    text: str
    description: str   # what was read, recorded in reports so numbers can be compared honestly


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("LLMOPT_DATA")
    return Path(value).expanduser() if value else None


def _wikitext_rows_from_raw(raw: str) -> list[str]:
    """The Hugging Face rows of a .raw file: one per line, whitespace-only lines as ''."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _wikitext(split: str, directory: Path | None) -> Text:
    if directory is not None:
        names = {"eval": ["wiki.test.raw"], "calib": ["wiki.train.raw", "wiki.valid.raw"],
                 "train": ["wiki.train.raw", "wiki.valid.raw"]}[split]
        for name in names:
            f = directory / name
            if f.is_file():
                rows = _wikitext_rows_from_raw(f.read_text(encoding="utf-8"))
                return Text("\n\n".join(rows), f"wikitext2:{f} (rows joined with \\n\\n)")
        raise UserError(f"wikitext2: {directory} holds none of {', '.join(names)}",
                        hint="point --data-dir / $LLMOPT_DATA at the wikitext-2-raw folder")
    try:
        import datasets
    except ImportError as e:
        raise UserError("wikitext2 needs --data-dir / $LLMOPT_DATA (a folder with wiki.test.raw) offline, "
                        "or the 'datasets' package online", hint="pip install 'llmopt[data]'") from e
    hf_split = {"eval": "test", "calib": "train", "train": "train"}[split]
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise UserError(f"could not load wikitext-2-raw-v1 ({hf_split}) through datasets: {type(e).__name__}",
                        hint="offline, set --data-dir / $LLMOPT_DATA to a folder with wiki.test.raw") from e
    return Text("\n\n".join(rows), f"wikitext2:datasets wikitext-2-raw-v1/{hf_split} (rows joined with \\n\\n)")


def _c4(split: str) -> Text:
    try:
        import datasets
    except ImportError as e:
        raise MissingExtra("datasets", "data", "the c4 source") from e
    shard = "en/c4-validation.00000-of-00008.json.gz"
    try:
        rows = datasets.load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load c4 ({shard}) through datasets: {type(e).__name__}",
                        hint="c4 needs network access; use wikitext2 with --data-dir, builtin, or a file") from e
    rows = rows[:3000] if split == "eval" else rows[3000:]
    return Text("\n\n".join(rows), f"c4:{shard}")


def _builtin(split: str) -> Text:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = len(keys) * 3 // 4
    chosen = keys[cut:] if split == "eval" else keys[:cut]
    part = "last quarter" if split == "eval" else "first three quarters"
    return Text("\n\n".join(topics[k] for k in chosen), f"builtin:pydoc_data.topics ({part} of {len(keys)} topics)")


def _file(path: Path) -> Text:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{n}: expected one JSON object with a \"text\" field per line") from e
        return Text("\n\n".join(rows), f"file:{path} (jsonl text fields joined with \\n\\n)")
    return Text(path.read_text(encoding="utf-8", errors="replace"), f"file:{path}")


def resolve_auto(source: str, directory: str | Path | None = None) -> str:
    """`auto` means wikitext2 when a data directory with WikiText-2 is configured, else builtin."""
    if (source or "").strip().lower() != "auto":
        return source
    d = data_dir(directory)
    return "wikitext2" if d is not None and (d / "wiki.test.raw").is_file() else "builtin"


def load_text(source: str, split: str = "eval", directory: str | Path | None = None) -> Text:
    """Read a text source (see the module docstring). `split` is 'eval', 'calib' or 'train'."""
    name = resolve_auto(source, directory).strip()
    if name.lower() == "wikitext2":
        return _wikitext(split, data_dir(directory))
    if name.lower() == "c4":
        return _c4(split)
    if name.lower() == "builtin":
        return _builtin(split)
    path = Path(name).expanduser()
    if path.is_file():
        return _file(path)
    if path.is_dir():
        for candidate in ("wiki.test.raw",) if split == "eval" else ("wiki.train.raw", "wiki.valid.raw"):
            if (path / candidate).is_file():
                return _wikitext(split, path)
        raise UserError(f"data source {name} is a directory without wiki.*.raw files")
    raise UserError(f"data source '{name}' is neither a file nor one of {', '.join(NAMED_SOURCES)}",
                    hint="pass a .txt/.jsonl path, wikitext2 (with --data-dir), c4 or builtin")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once, as one 1-D tensor, without special tokens or length warnings."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens, in order (GPTQ convention); [n, seq_len]."""
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}",
                        hint="use a longer text or a smaller --seq-len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def random_windows(ids: torch.Tensor, nsamples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of seq_len tokens at seeded random offsets (calibration); [nsamples, seq_len]."""
    if nsamples <= 0:
        raise UserError(f"--nsamples must be positive, got {nsamples}")
    if ids.numel() <= seq_len:
        raise UserError(f"the calibration text has {ids.numel()} tokens, not more than one window of {seq_len}",
                        hint="use a longer text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def text_windows(tokenizer, source: str, split: str, seq_len: int, *, nsamples: int | None = None,
                 seed: int = 0, max_windows: int | None = None, directory: str | Path | None = None
                 ) -> tuple[torch.Tensor, str]:
    """Read a source and cut it: random windows when `nsamples` is given, else ordered eval windows."""
    if seq_len <= 0:
        raise UserError(f"--seq-len must be positive, got {seq_len}")
    text = load_text(source, split, directory)
    ids = tokenize(tokenizer, text.text)
    if nsamples is not None:
        return random_windows(ids, nsamples, seq_len, seed), text.description
    return eval_windows(ids, seq_len, max_windows), text.description
