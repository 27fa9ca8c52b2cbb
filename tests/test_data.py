"""Data loading, held-out splitting, tokenization cache and packing (gqa_uptrain.data.text)."""

from __future__ import annotations

import json

import datasets
import pytest
from _uptrain_fixtures import build_tokenizer, copy_docs

from gqa_uptrain.data import text as data_mod
from gqa_uptrain.data.text import DataConfig, load_text_dataset, prepare_data, tokenize_and_pack
from gqa_uptrain.errors import GQAError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = copy_docs(root / "text", max_bytes=120_000)
    tok = build_tokenizer(text, root / "tok")
    return root, text, tok


def test_folder_of_text_packs_into_full_blocks_with_eos(corpus, tmp_path):
    root, text, tok = corpus
    cfg = DataConfig(source=str(text), block_size=64, eval_fraction=0.1, cache_dir=str(tmp_path / "c"))
    packed = prepare_data(cfg, tok)
    assert packed.num_train_blocks and packed.num_train_blocks > 100
    rows = packed.train["input_ids"]
    assert all(len(r) == 64 for r in rows)
    # EOS separates documents: each training document contributes one (minus dropped tails).
    n_eos = sum(r.count(tok.eos_token_id) for r in rows)
    n_docs = len(list(text.iterdir()))
    assert 0 < n_eos <= n_docs
    assert packed.eval is not None and len(packed.eval) > 0
    # Held-out documents are not trained on: no held-out block appears among training blocks.
    train_set = {tuple(r) for r in rows}
    assert not any(tuple(r) in train_set for r in packed.eval["input_ids"])


def test_tokenization_is_cached_across_calls(corpus, tmp_path, monkeypatch):
    root, text, tok = corpus
    cfg = DataConfig(source=str(text), block_size=64, cache_dir=str(tmp_path / "c"))
    first = prepare_data(cfg, tok)

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache is warm")

    monkeypatch.setattr(data_mod, "_tokenize_batch", boom)
    second = prepare_data(cfg, tok)
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.fingerprint == first.fingerprint
    # A different block size must not reuse the cache (it would hit the patched tokenizer).
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_data(DataConfig(source=str(text), block_size=32, cache_dir=str(tmp_path / "c")), tok)


def test_streaming_packs_exactly_and_holds_out_first_documents(corpus):
    root, text, tok = corpus
    cfg = DataConfig(source=str(text), block_size=50, streaming=True, eval_documents=2)
    packed = prepare_data(cfg, tok)
    assert packed.num_train_blocks is None
    blocks = [r["input_ids"] for r in packed.train]
    docs = sorted(text.iterdir())[2:]
    n_tokens = sum(len(tok(p.read_text(), add_special_tokens=False)["input_ids"]) + 1 for p in docs)
    assert len(blocks) == n_tokens // 50  # remainders carried across documents: nothing lost
    assert packed.eval is not None and len(packed.eval) >= 1


def test_streaming_without_eval_count_is_refused(corpus):
    _, text, tok = corpus
    with pytest.raises(GQAError, match="data.eval_documents"):
        prepare_data(DataConfig(source=str(text), streaming=True), tok)


def test_jsonl_and_parquet_sources(corpus, tmp_path):
    _, text, tok = corpus
    rows = [{"content": p.read_text(), "id": i} for i, p in enumerate(sorted(text.iterdir()))]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_text_dataset(DataConfig(source=str(jl), text_column="content"))
    assert len(ds) == len(rows) and ds[0]["content"] == rows[0]["content"]
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    ds = load_text_dataset(DataConfig(source=[str(pq)], text_column="content"))
    assert len(ds) == len(rows)
    with pytest.raises(GQAError, match=r"no column 'text' \(columns: content, id\)"):
        load_text_dataset(DataConfig(source=str(jl)))


def test_bad_sources_are_clear_errors(corpus, tmp_path):
    _, text, tok = corpus
    with pytest.raises(GQAError, match="not found"):
        load_text_dataset(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "a.txt").write_text("hello")
    (tmp_path / "mix" / "b.jsonl").write_text('{"text": "x"}')
    with pytest.raises(GQAError, match="mixes file formats"):
        load_text_dataset(DataConfig(source=str(tmp_path / "mix")))
    small = datasets.Dataset.from_dict({"text": ["tiny"]})
    with pytest.raises(GQAError, match="fewer than one block"):
        tokenize_and_pack(small, tok, block_size=64)


def test_hub_source_passes_name_split_streaming_revision(monkeypatch):
    seen = {}

    def fake_load(path, name=None, **kw):
        seen.update(path=path, name=name, **kw)
        return datasets.Dataset.from_dict({"body": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(source="org/corpus", name="en", split="validation", revision="v1", text_column="body")
    ds = load_text_dataset(cfg)
    assert len(ds) == 2
    assert seen["path"] == "org/corpus" and seen["name"] == "en"
    assert seen["split"] == "validation" and seen["revision"] == "v1" and seen["streaming"] is False
