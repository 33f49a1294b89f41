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
- a path to a `.jsonl` file (its `"text"` fields joined with "\\n\\n"), a WikiText `.raw` file
  (named `wiki.*.raw`, or WikiText by its content: read exactly as `wikitext2` reads it, so the same
  file gives the same numbers both ways), any other text file (used as is), or a folder holding
  `wiki.*.raw` files (read as `wikitext2` with that folder).

`check_source` refuses, without reading the text or the network, the sources `load_text` would
refuse for want of a file, folder or package (a missing file, a folder without the split's
`wiki.*.raw`, wikitext2 with neither a data folder nor `datasets`, c4 without `datasets`); a file's
content is judged when it is read. Each command's options call it in `validate()`,
so `llmopt run --dry-run` and a recipe's start catch it instead of the step that reads the text.

Evaluation follows the GPTQ paper's convention: the split's rows joined with "\\n\\n", tokenized
once, cut into non-overlapping windows. Windows start with the BOS token when the model's tokenizer
puts one first by itself (Gemma does, SmolLM2 does not), as llama.cpp's perplexity does: the model
was trained to see it and scores worse without it. A BOS window keeps `seq_len` tokens (BOS and
seq_len - 1 text tokens), and the prediction made from the BOS alone is not scored, so every window
scores the text tokens after its first, with or without BOS. `load_windows` also counts the UTF-8
bytes of the text the scored tokens cover, for bits per byte (comparable across tokenizers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.errors import MissingExtra, UserError

NAMED_SOURCES = ("wikitext2", "c4", "builtin")
# the WikiText-2 files each split reads from a data folder, first present wins (never test for calibration)
WIKI_FILES = {"eval": ("wiki.test.raw",), "calib": ("wiki.train.raw", "wiki.valid.raw"),
              "train": ("wiki.train.raw", "wiki.valid.raw")}
DATA_DIR_HINT = "point --data-dir / $LLMOPT_DATA at the wikitext-2-raw folder"


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


def _wiki_file(directory: Path, split: str, what: str) -> Path:
    """The WikiText-2 file `split` reads from this folder; UserError naming the files looked for."""
    for name in WIKI_FILES[split]:
        if (directory / name).is_file():
            return directory / name
    if not directory.is_dir():
        raise UserError(f"{what}: data directory {directory} does not exist", hint=DATA_DIR_HINT)
    raise UserError(f"{what}: {directory} holds none of {', '.join(WIKI_FILES[split])}", hint=DATA_DIR_HINT)


def _wikitext(split: str, directory: Path | None, what: str = "wikitext2") -> Text:
    if directory is not None:
        f = _wiki_file(directory, split, what)
        rows = _wikitext_rows_from_raw(f.read_text(encoding="utf-8"))
        return Text("\n\n".join(rows), f"wikitext2:{f} (rows joined with \\n\\n)")
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


WIKITEXT_NAME = re.compile(r"wiki\.[A-Za-z0-9_-]+\.raw")
_WIKITEXT_HEADING = re.compile(r" = [^=\n].* = ")
_WIKITEXT_MARKERS = (" @-@ ", " @,@ ", " @.@ ")


def is_wikitext_raw(path: Path, raw: str) -> bool:
    """A WikiText .raw file: named wiki.*.raw, or its first non-blank line a ` = Title = ` heading and
    the text holding WikiText's ` @-@ ` style markers."""
    if WIKITEXT_NAME.fullmatch(path.name):
        return True
    first = next((line for line in raw[:10_000].splitlines() if line.strip()), "")
    return bool(_WIKITEXT_HEADING.fullmatch(first)) and any(m in raw for m in _WIKITEXT_MARKERS)


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
    raw = path.read_text(encoding="utf-8", errors="replace")
    if is_wikitext_raw(path, raw):
        return Text("\n\n".join(_wikitext_rows_from_raw(raw)),
                    f"wikitext2-format file:{path} (WikiText .raw: rows joined with \\n\\n, as wikitext2 reads it)")
    return Text(raw, f"file:{path} (plain text, read as is)")


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
        return _wikitext(split, path, f"data source {name}")
    raise UserError(f"data source '{name}' is neither a file nor one of {', '.join(NAMED_SOURCES)}",
                    hint=SOURCE_HINT)


SOURCE_HINT = f"pass a .txt/.jsonl file, a folder with wiki.*.raw, or one of {', '.join(NAMED_SOURCES)}"


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_source(source: str, flag: str, split: str, directory: str | Path | None = None) -> None:
    """Refuse a source that `load_text(source, split, directory)` would refuse, without reading it or the
    network: the one check every options class's validate() runs, so a recipe's --dry-run catches it.

    `flag` names the option in the message (--ppl-data, --calib, --data). Online sources only need the
    `datasets` package to be importable here; whether the hub answers is known when the text is read.
    """
    name = resolve_auto(source, directory).strip()
    key = name.lower()
    if key == "builtin":
        return
    if key == "c4":
        if not _importable("datasets"):
            raise MissingExtra("datasets", "data", f"{flag} c4 (read through the hub)")
        return
    if key == "wikitext2":
        d = data_dir(directory)
        if d is not None:
            _wiki_file(d, split, f"{flag} wikitext2")
        elif not _importable("datasets"):
            raise UserError(f"{flag} wikitext2 needs a data directory (--data-dir or $LLMOPT_DATA: a folder with "
                            f"{' or '.join(WIKI_FILES[split])}) offline, or the 'datasets' package online",
                            hint=DATA_DIR_HINT + ", or pip install 'llmopt[data]'")
        return
    path = Path(name).expanduser()
    if path.is_dir():
        _wiki_file(path, split, f"{flag} {name}")
    elif not path.is_file():
        raise UserError(f"{flag} {name} is neither a file nor one of {', '.join(NAMED_SOURCES)} (it does not exist)",
                        hint=SOURCE_HINT)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once, as one 1-D tensor, without special tokens or length warnings."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    """A text tokenized once, and where each token ends in the text's UTF-8 bytes (for bits per byte)."""

    ids: torch.Tensor                 # [N]
    byte_ends: torch.Tensor | None    # [N] int64; None when the tokenizer gives no usable offsets


def _byte_ends(text: str, char_ends: list[int]) -> torch.Tensor | None:
    """Character offsets to UTF-8 byte offsets; None unless they are ordered and cover the text."""
    try:
        points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    except UnicodeEncodeError:
        return None
    width = 1 + (points >= 0x80).long() + (points >= 0x800).long() + (points >= 0x10000).long()
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), width.cumsum(0)])
    ends = torch.tensor(char_ends, dtype=torch.long)
    if ends.numel() == 0 or ends.max() > len(text) or bool((ends[1:] < ends[:-1]).any()):
        return None
    if int(ends[-1]) < len(text.rstrip()):
        return None
    return prefix[ends]


def tokenize_corpus(tokenizer, text: str) -> Corpus:
    """`tokenize`, plus the byte offsets of the fast tokenizers' offset mapping."""
    if not getattr(tokenizer, "is_fast", False):
        return Corpus(tokenize(tokenizer, text), None)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False,
                    return_offsets_mapping=True)
    return Corpus(torch.tensor(enc["input_ids"], dtype=torch.long),
                  _byte_ends(text, [end for _, end in enc["offset_mapping"]]))


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts it first by itself (`tokenizer("x")`), as the model was trained
    to see its input; None when it does not (or has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say is treated as adding nothing
        return None
    return bos if len(ids) > 0 and ids[0] == bos else None


@dataclass
class Windows:
    """Model inputs cut from a text, with what scoring them needs to know."""

    ids: torch.Tensor                   # [n, seq_len]
    bos: bool = False                   # position 0 is the tokenizer's BOS, not text
    scored_bytes: torch.Tensor | None = None   # [n] UTF-8 bytes of the text the scored targets cover
    description: str = ""

    @property
    def first_target(self) -> int:
        """Position of the first scored target: the prediction from BOS alone, like that of a window's
        first text token without context, is not scored."""
        return 2 if self.bos else 1

    def __len__(self) -> int:
        return len(self.ids)

    def part(self, rows: slice) -> "Windows":
        """These rows of the windows, with their byte counts (a held-out tail, say)."""
        scored = None if self.scored_bytes is None else self.scored_bytes[rows]
        return Windows(self.ids[rows], self.bos, scored, self.description)


def _with_bos(chunks: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return chunks
    return torch.cat([torch.full((len(chunks), 1), bos, dtype=chunks.dtype), chunks], dim=1)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens, in order (GPTQ convention); [n, seq_len]."""
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}",
                        hint="use a longer text or a smaller --seq-len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def cut_eval(corpus: Corpus, seq_len: int, max_windows: int | None = None, bos: int | None = None,
             description: str = "") -> Windows:
    """Ordered non-overlapping windows of seq_len tokens (BOS and seq_len - 1 text tokens when `bos`),
    with the bytes their scored tokens cover."""
    if bos is not None and seq_len < 3:
        raise UserError(f"--seq-len {seq_len} leaves no token to score after the BOS and the first text token",
                        hint="use --seq-len 3 or more")
    span = text_per_window(seq_len, bos)
    chunks = eval_windows(corpus.ids, span, max_windows)
    scored = None
    if corpus.byte_ends is not None:
        starts = torch.arange(len(chunks)) * span
        scored = corpus.byte_ends[starts + span - 1] - corpus.byte_ends[starts]
    return Windows(_with_bos(chunks, bos), bos is not None, scored, description)


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


def load_windows(tokenizer, source: str, split: str, seq_len: int, *, nsamples: int | None = None,
                 seed: int = 0, max_windows: int | None = None, directory: str | Path | None = None) -> Windows:
    """Read a source and cut it for this tokenizer: `nsamples` random windows (calibration) or ordered
    eval windows, BOS first when the tokenizer adds one (see the module docstring)."""
    if seq_len <= 0:
        raise UserError(f"--seq-len must be positive, got {seq_len}")
    text = load_text(source, split, directory)
    bos = bos_id(tokenizer)
    description = text.description + ("; BOS first in every window" if bos is not None else "")
    if nsamples is None:
        return cut_eval(tokenize_corpus(tokenizer, text.text), seq_len, max_windows, bos, description)
    if bos is not None and seq_len < 2:
        raise UserError("--seq-len must be at least 2 to hold the BOS and a text token")
    chunks = random_windows(tokenize(tokenizer, text.text), nsamples, text_per_window(seq_len, bos), seed)
    return Windows(_with_bos(chunks, bos), bos is not None, None, description)


def text_per_window(seq_len: int, bos: int | None) -> int:
    """Text tokens in a window of seq_len tokens: all of them, or all but the BOS."""
    return seq_len - 1 if bos is not None else seq_len


def text_windows(tokenizer, source: str, split: str, seq_len: int, *, nsamples: int | None = None,
                 seed: int = 0, max_windows: int | None = None, directory: str | Path | None = None
                 ) -> tuple[torch.Tensor, str]:
    """`load_windows` as (ids [n, seq_len], description), for calibration and training callers. Scoring
    these ids as plain windows would also score the prediction from a BOS: evaluate `load_windows`."""
    w = load_windows(tokenizer, source, split, seq_len, nsamples=nsamples, seed=seed, max_windows=max_windows,
                     directory=directory)
    return w.ids, w.description
