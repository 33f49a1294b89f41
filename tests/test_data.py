"""Text sources and windows: the GPTQ evaluation convention, seeded calibration, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from llmopt import data
from llmopt.errors import UserError


def test_wikitext_rows_follow_the_hf_convention(wikitext_dir):
    text = data.load_text("wikitext2", "eval", wikitext_dir)
    raw = (wikitext_dir / "wiki.test.raw").read_text()
    rows = data._wikitext_rows_from_raw(raw)
    assert len(rows) == 4358                       # one row per line, as the HF loader yields
    assert "".join(r if r else " \n" for r in rows) == raw  # the documented exact inverse
    assert text.text == "\n\n".join(rows)
    assert "wiki.test.raw" in text.description


def test_calibration_never_reads_test_split(wikitext_dir):
    assert "wiki.valid.raw" in data.load_text("wikitext2", "calib", wikitext_dir).description


def test_auto_picks_wikitext_only_when_configured(wikitext_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOPT_DATA", raising=False)
    assert data.resolve_auto("auto", wikitext_dir) == "wikitext2"
    assert data.resolve_auto("auto", None) == "builtin"
    assert data.resolve_auto("auto", tmp_path) == "builtin"
    assert data.resolve_auto("c4", None) == "c4"


def test_builtin_splits_do_not_overlap():
    calib = data.load_text("builtin", "calib").text
    evald = data.load_text("builtin", "eval").text
    assert len(calib) > 200_000 and len(evald) > 50_000
    assert evald[:2000] not in calib


def test_windows(tiny_tokenizer):
    ids = torch.arange(1000)
    w = data.eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w[1], torch.arange(128, 256))
    assert data.eval_windows(ids, 128, max_windows=2).shape == (2, 128)
    a = data.random_windows(ids, 5, 64, seed=3)
    assert torch.equal(a, data.random_windows(ids, 5, 64, seed=3))
    assert not torch.equal(a, data.random_windows(ids, 5, 64, seed=4))
    with pytest.raises(UserError, match="fewer than one window"):
        data.eval_windows(ids, 2048)
    with pytest.raises(UserError, match="nsamples"):
        data.random_windows(ids, 0, 64, 0)


def test_jsonl_and_txt_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha", "beta"]) + "\n")
    assert data.load_text(str(f)).text == "alpha\n\nbeta"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": 1}\n')
    with pytest.raises(UserError, match="text"):
        data.load_text(str(bad))
    t = tmp_path / "t.txt"
    t.write_text("hello world")
    assert data.load_text(str(t)).text == "hello world"


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="neither a file nor"):
        data.load_text(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- WikiText .raw files

def test_wikitext_raw_file_is_read_as_wikitext2(wikitext_dir):
    """--ppl-data path/to/wiki.test.raw gives exactly the text of --ppl-data wikitext2, and says so."""
    as_file = data.load_text(str(wikitext_dir / "wiki.test.raw"))
    assert as_file.text == data.load_text("wikitext2", "eval", wikitext_dir).text
    assert "rows joined with \\n\\n" in as_file.description and "wiki.test.raw" in as_file.description


WIKI_SAMPLE = " \n = Valkyria Chronicles = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing game .\n \n"


def test_wikitext_content_is_recognised_under_any_name(tmp_path):
    article = tmp_path / "article.txt"
    article.write_text(WIKI_SAMPLE)
    text = data.load_text(str(article))
    assert text.text == "\n\n".join(data._wikitext_rows_from_raw(WIKI_SAMPLE))
    assert text.description.startswith("wikitext2-format file:")
    notes = tmp_path / "notes.raw"
    notes.write_text("plain notes\n \nnothing WikiText about them\n")
    plain = data.load_text(str(notes))
    assert plain.text == "plain notes\n \nnothing WikiText about them\n" and "read as is" in plain.description


# ----------------------------------------------------------------------------- BOS and bytes

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each character of a byte-level token stands for one byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_len(tokenizer, ids) -> int:
    """UTF-8 bytes that byte-level BPE tokens stand for, from the tokens themselves (not their offsets)."""
    table = _byte_decoder()
    return sum(len(tok) for tok in tokenizer.convert_ids_to_tokens([int(i) for i in ids])
               if all(ch in table for ch in tok))


@pytest.fixture(scope="session")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, but putting <s> first by itself, as Gemma's does."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_bos_is_taken_from_the_tokenizer(tiny_tokenizer, bos_tokenizer):
    assert data.bos_id(tiny_tokenizer) is None
    assert data.bos_id(bos_tokenizer) == bos_tokenizer.bos_token_id == 1


def test_eval_windows_start_with_bos_and_keep_seq_len(bos_tokenizer):
    ids = data.tokenize(bos_tokenizer, data.load_text("builtin").text)
    w = data.load_windows(bos_tokenizer, "builtin", "eval", 64, max_windows=3)
    assert w.ids.shape == (3, 64) and w.bos and w.first_target == 2
    assert (w.ids[:, 0] == 1).all()
    assert torch.equal(w.ids[:, 1:], ids[: 3 * 63].view(3, 63))     # BOS + seq_len - 1 text tokens, in order
    assert "BOS first" in w.description


def test_calibration_windows_start_with_bos(bos_tokenizer, tiny_tokenizer):
    ids, description = data.text_windows(bos_tokenizer, "builtin", "calib", 32, nsamples=4, seed=0)
    assert ids.shape == (4, 32) and (ids[:, 0] == 1).all() and "BOS first" in description
    plain, description = data.text_windows(tiny_tokenizer, "builtin", "calib", 32, nsamples=4, seed=0)
    assert plain.shape == (4, 32) and "BOS" not in description
    calib_ids = data.tokenize(tiny_tokenizer, data.load_text("builtin", "calib").text)
    assert torch.equal(plain, data.random_windows(calib_ids, 4, 32, 0))       # no BOS: as before


@pytest.mark.parametrize("with_bos", [False, True])
def test_scored_bytes_are_the_bytes_of_the_scored_tokens(tiny_tokenizer, bos_tokenizer, tmp_path, with_bos):
    """Bits per byte divides by the bytes of exactly the tokens scored (ASCII text: one byte per character)."""
    tok = bos_tokenizer if with_bos else tiny_tokenizer
    f = tmp_path / "t.txt"
    f.write_text("".join(ch for ch in data.load_text("builtin").text[:40_000] if ch.isascii()))
    w = data.load_windows(tok, str(f), "eval", 50, max_windows=20)
    assert w.scored_bytes is not None and len(w.scored_bytes) == 20
    for k in range(20):
        assert int(w.scored_bytes[k]) == byte_len(tok, w.ids[k, w.first_target:]), k


def test_multibyte_characters_are_counted_in_full(tiny_tokenizer, tmp_path):
    """Every UTF-8 byte of the text belongs to exactly one token; a character the tokenizer splits into
    several byte tokens counts toward the first of them, so a window is off by at most its 3 other bytes."""
    text = "Größe und Maß: 日本語のテキスト, naïve café — " * 40
    corpus = data.tokenize_corpus(tiny_tokenizer, text)
    per_token = torch.diff(corpus.byte_ends, prepend=torch.zeros(1, dtype=torch.long))
    assert int(per_token.sum()) == len(text.encode()) and (per_token >= 0).all()
    f = tmp_path / "t.txt"
    f.write_text(text)
    w = data.load_windows(tiny_tokenizer, str(f), "eval", 50)
    for k in range(len(w)):
        assert abs(int(w.scored_bytes[k]) - byte_len(tiny_tokenizer, w.ids[k, 1:])) <= 3, k


# ----------------------------------------------------------------------------- data sources checked up front

@pytest.fixture
def offline(monkeypatch):
    """No data directory configured and no `datasets` package: the offline machine wikitext2 and c4 fail on."""
    import sys

    monkeypatch.delenv("LLMOPT_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)     # find_spec says None and `import datasets` fails


def _gaps(tmp_path) -> list[tuple[str, str | None, str]]:
    """(source, data_dir, message) that load_text refuses for every split; each passes a shallow
    exists-or-named check."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return [("wikitext2", None, "needs a data directory"),
            ("wikitext2", str(empty), f"{empty} holds none of"),
            ("wikitext2", str(tmp_path / "absent"), "does not exist"),
            ("c4", None, "llmopt[data]"),
            (str(empty), None, f"{empty} holds none of"),
            (str(tmp_path / "missing.txt"), None, "neither a file")]


def _refused(call, message: str) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert message in str(e.value)
    return str(e.value)


def test_check_source_refuses_what_load_text_refuses(tmp_path, offline):
    for source, directory, message in _gaps(tmp_path):
        for split in ("eval", "calib", "train"):
            _refused(lambda: data.check_source(source, "--data", split, directory), message)
            _refused(lambda: data.load_text(source, split, directory), "")


def test_check_source_knows_which_files_each_split_reads(tmp_path, wikitext_dir, offline):
    """Evaluation reads wiki.test.raw only; calibration and training read train or valid, never test."""
    valid_only, test_only = tmp_path / "valid", tmp_path / "test"
    for folder, name in ((valid_only, "wiki.valid.raw"), (test_only, "wiki.test.raw")):
        folder.mkdir()
        (folder / name).write_text(" = A = \n")
    for source, directory in (("wikitext2", str(valid_only)), (str(valid_only), None)):
        _refused(lambda: data.check_source(source, "--ppl-data", "eval", directory), "holds none of wiki.test.raw")
        for split in ("calib", "train"):
            data.check_source(source, "--calib", split, directory)
            data.load_text(source, split, directory)
    for split in ("calib", "train"):
        _refused(lambda: data.check_source(str(test_only), "--calib", split), "holds none of wiki.train.raw, "
                 "wiki.valid.raw")
    for source, directory, split in [("builtin", None, "eval"), ("auto", None, "calib"),
                                     ("wikitext2", str(wikitext_dir), "eval"), (str(wikitext_dir), None, "train"),
                                     (str(wikitext_dir / "wiki.test.raw"), None, "eval")]:
        data.check_source(source, "--data", split, directory)
        data.load_text(source, split, directory)


def _options(kind: str, source: str, directory: str | None):
    """Options of one command whose only problem can be its data source, and the flag naming it."""
    from llmopt.bench.run import BenchOptions
    from llmopt.distill import DistillOptions
    from llmopt.prune import PruneOptions
    from llmopt.quantize.options import QuantizeOptions

    if kind == "bench":
        return BenchOptions(["smollm2-135m"], ppl_data=source, data_dir=directory, device="cpu"), "--ppl-data"
    if kind == "prune":
        return PruneOptions("m", "o", calib=source, data_dir=directory, device="cpu"), "--calib"
    if kind == "distill":
        return DistillOptions("t", "s", "o", data=source, data_dir=directory, device="cpu"), "--data"
    return QuantizeOptions("m", "o", method="gptq", calib=source, data_dir=directory, device="cpu"), "--calib"


@pytest.mark.parametrize("kind", ["bench", "prune", "distill", "quantize"])
def test_every_command_refuses_data_gaps_in_validate(kind, tmp_path, offline):
    """validate() (what a recipe's --dry-run and its start run) refuses each source load_text would refuse,
    naming the command's own flag."""
    for source, directory, message in _gaps(tmp_path):
        opts, flag = _options(kind, source, directory)
        assert flag in _refused(opts.validate, message), (kind, source)


def test_bench_validate_refuses_a_data_dir_without_the_test_split(tmp_path, offline):
    """bench evaluates on wiki.test.raw: a folder with only the validation split is refused up front."""
    (tmp_path / "wiki.valid.raw").write_text(" = A = \n")
    opts, _ = _options("bench", "wikitext2", str(tmp_path))
    _refused(opts.validate, "holds none of wiki.test.raw")
