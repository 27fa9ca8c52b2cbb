"""Calibration text the tokenizer does not cover gets one warning line with the measured share of
unknown or byte-fallback tokens (issue 22); text it covers gets none.

The tokenizer is a real byte-level BPE trained here on real English (the Python docs), as the
families' own tokenizers are trained on their languages: random bytes and a script it never saw
fall back to raw bytes, English does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from _uptrain_fixtures import build_model, build_tokenizer, copy_docs

from gqa_uptrain.data.coverage import POOR_COVERAGE_SHARE, coverage_warning, token_coverage
from gqa_uptrain.io.checkpoint import Source
from gqa_uptrain.merging.calibration import CalibrationSpec, calibration_tokens

# Chinese (a script the English-trained vocabulary has no tokens for): a paragraph about language models.
CHINESE = (
    "语言模型是一种根据前文预测下一个词的概率模型。注意力机制让模型在生成每个词时查看前面所有的词，"
    "而键值缓存保存了这些词的键和值，使生成更快。分组查询注意力让多个查询头共享同一组键和值，"
    "从而把缓存缩小数倍，同时几乎不损失质量。"
)


@pytest.fixture(scope="module")
def english_model(tmp_path_factory, python_docs) -> tuple[Path, Path]:
    """(a tiny Llama with a BPE tokenizer trained on English docs, a folder of other English docs)."""
    root = tmp_path_factory.mktemp("coverage")
    train = copy_docs(root / "train", 300_000, "tutorial")
    tok = build_tokenizer(train, root / "model", vocab_size=1024)
    build_model(root / "model", tok, layers=2)
    english = copy_docs(root / "english", 60_000, "howto")
    return root / "model", english


def _tokens(model: Path, data: Path, caplog, n: int = 2048) -> list[str]:
    """Tokenize ``data`` for calibration as a conversion does; the warnings it logged."""
    import json

    src = Source(folder=model, config=json.loads((model / "config.json").read_text()), reader=None, name="m")  # type: ignore[arg-type]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gqa_uptrain"):
        ids = calibration_tokens(src, CalibrationSpec(str(data), n, 64))
    assert isinstance(ids, torch.Tensor) and ids.numel() > 0
    return [r.getMessage() for r in caplog.records if "byte-fallback" in r.getMessage()]


def _share(message: str) -> float:
    return float(message.split(": ", 1)[1].split("%")[0]) / 100


def test_random_bytes_warn_with_the_measured_share(english_model, tmp_path, caplog):
    model, _ = english_model
    data = tmp_path / "random.txt"
    data.write_bytes(os.urandom(40_000))
    (warning,) = _tokens(model, data, caplog)
    assert "\n" not in warning and str(data) in warning
    assert _share(warning) > 0.3  # measured: most tokens are raw bytes of U+FFFD
    assert "byte-fallback" in warning and "will not help" in warning


def test_a_foreign_script_warns(english_model, tmp_path, caplog):
    model, _ = english_model
    data = tmp_path / "zh.txt"
    data.write_text(CHINESE * 40, encoding="utf-8")
    (warning,) = _tokens(model, data, caplog)
    assert _share(warning) > 0.5  # each character is three byte tokens


def test_english_does_not_warn(english_model, caplog):
    model, english = english_model
    assert _tokens(model, english, caplog) == []
    # ... and measures as covered, not merely under the threshold by luck.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = "\n".join(p.read_text() for p in sorted(english.iterdir()))
    cov = token_coverage(tok, tok(text, add_special_tokens=False)["input_ids"])
    assert cov.tokens > 2000 and cov.share < POOR_COVERAGE_SHARE / 5


def test_unknown_tokens_are_counted():
    """A word-level vocabulary's unknown token counts as much as a byte fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cov = token_coverage(fast, fast("the cat sat on a mat", add_special_tokens=False)["input_ids"])
    assert (cov.tokens, cov.unknown, cov.byte_fallback) == (6, 3, 0)
    message = coverage_warning(cov, "notes.txt")
    assert message is not None and "50% of its 6 tokens" in message and "50% unknown" in message
    assert coverage_warning(token_coverage(fast, [1, 2, 3]), "x") is None


@pytest.mark.slow  # a calibrated conversion of a tiny model through the CLI
def test_cli_conversion_on_random_bytes_warns_once(english_model, tmp_path):
    """The warning reaches the user of gqa-convert, once, and the conversion still completes."""
    from typer.testing import CliRunner

    from gqa_uptrain.cli.convert import app

    model, _ = english_model
    data = tmp_path / "blob.bin.txt"
    data.write_bytes(os.urandom(30_000))
    res = CliRunner().invoke(
        app,
        [str(model), str(tmp_path / "out"), "-g", "1", "--calibration", str(data), "--calibration-tokens",
         "1024", "--calibration-seq-len", "64", "--refine-steps", "2", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "byte-fallback" in line]
    assert len(lines) == 1, res.output
    assert (tmp_path / "out" / "config.json").is_file()
