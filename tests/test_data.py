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
