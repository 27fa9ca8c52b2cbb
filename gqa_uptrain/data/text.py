"""Text data for uptraining and perplexity: load, hold out, tokenize, pack into fixed-length blocks.

Sources are anything ``datasets`` reads, named the way users name them:

- a Hub dataset id (``"HuggingFaceFW/fineweb-edu"``, with ``name``/``split``/``streaming``);
- local files: plain text (``.txt``, ``.md``, ``.rst``, ... anything that is not structured),
  JSON lines / JSON (``.jsonl``, ``.json``), Parquet (``.parquet``), CSV (``.csv``);
- a folder of such files (searched recursively, hidden files skipped), or several paths / globs.

The pipeline is the one ``run_clm.py`` made standard: split documents into train / held-out
*before* tokenization (no block straddles the two), tokenize each document and append EOS, then
concatenate and cut into ``block_size`` blocks, dropping each map batch's remainder. Every map
step gets an explicit fingerprint derived from the source dataset, the tokenizer's content and the
packing settings, so ``datasets`` finds its cache on a second run (a resumed run never tokenizes
again) and a changed tokenizer or block size never reuses a stale cache.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from ..errors import ConfigError, GQAError
from .config import DataConfig, _hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset

# File suffix -> `datasets` packaged builder. Anything else is read as plain text.
_STRUCTURED_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_PACK_VERSION = "pack-v1"  # bump when the packing logic changes, to invalidate old caches


@dataclass
class PackedData:
    """Tokenized, packed train and held-out blocks (each row: ``input_ids`` of ``block_size`` ints)."""

    train: AnyDataset
    eval: datasets.Dataset | None
    block_size: int
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train_blocks(self) -> int | None:
        """Number of training blocks, or ``None`` for a streamed dataset (unknown length)."""
        return len(self.train) if isinstance(self.train, datasets.Dataset) else None


def _as_list(source: str | list[str]) -> list[str]:
    return [source] if isinstance(source, str) else list(source)


def _looks_local(s: str) -> bool:
    """Whether a source string is meant as a path (so a missing one is an error, not a Hub id)."""
    p = Path(os.path.expanduser(s))
    return (
        p.exists()
        or s.startswith((".", "/", "~"))
        or any(ch in s for ch in "*?[")
        or p.suffix.lower() in (*_STRUCTURED_BUILDERS, ".txt", ".md", ".rst", ".text")
        or s.count("/") > 1
    )


def _local_files(paths: list[str]) -> list[str]:
    """Expand files, folders (recursive, hidden entries skipped) and globs to a sorted file list."""
    files: list[str] = []
    for raw in paths:
        s = os.path.expanduser(raw)
        p = Path(s)
        if p.is_file():
            files.append(str(p))
        elif p.is_dir():
            found = sorted(
                str(f)
                for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise GQAError(
                    f"data source folder {p} holds no files; point data.source at text/JSON/Parquet files"
                )
            files.extend(found)
        else:
            matches = sorted(f for f in glob.glob(s, recursive=True) if Path(f).is_file())
            if not matches:
                raise GQAError(
                    f"data source {raw} not found; give an existing file, folder or glob, or a Hub dataset id"
                )
            files.extend(matches)
    return files


def _builder_for(files: list[str]) -> str:
    """The one ``datasets`` builder that reads all ``files``; mixed formats are refused."""
    builders = {_STRUCTURED_BUILDERS.get(Path(f).suffix.lower(), "text") for f in files}
    if len(builders) > 1:
        raise GQAError(
            f"data source mixes file formats ({', '.join(sorted(builders))}); "
            "point data.source at files of one format"
        )
    return builders.pop()


def _load_split(cfg: DataConfig, split: str) -> AnyDataset:
    """Load one split of the configured source, local or Hub, without any checks."""
    sources = _as_list(cfg.source)
    if not sources or not all(sources):
        raise ConfigError(
            "recipe key data.source: missing; name a Hub dataset or local text/JSON/Parquet files"
        )
    local = [_looks_local(s) for s in sources]
    if any(local):
        if not all(local):
            raise ConfigError("recipe key data.source: mixes local paths and Hub ids; use one kind")
        files = _local_files(sources)
        builder = _builder_for(files)
        kwargs: dict[str, Any] = {}
        if builder == "text":
            # keep_linebreaks: documents keep their layout (code, lists) as the model saw in pretraining.
            kwargs.update(sample_by=cfg.sample_by, keep_linebreaks=True)
        logger.info("reading %d local %s file(s) from %s", len(files), builder, ", ".join(sources))
        # Local files are one "train" split; `split` other than train is meaningful for Hub data only.
        return datasets.load_dataset(
            builder,
            data_files={"train": files},
            split="train",
            streaming=cfg.streaming,
            cache_dir=cfg.cache_dir,
            **kwargs,
        )
    if len(sources) > 1:
        raise ConfigError("recipe key data.source: give one Hub dataset id, not a list")
    logger.info(
        "loading Hub dataset %s (config=%s, split=%s, streaming=%s)",
        sources[0],
        cfg.name,
        split,
        cfg.streaming,
    )
    try:
        return datasets.load_dataset(
            sources[0],
            cfg.name,
            split=split,
            streaming=cfg.streaming,
            revision=cfg.revision,
            cache_dir=cfg.cache_dir,
        )
    except (FileNotFoundError, ValueError) as e:
        # datasets raises these for unknown repos, configs and splits; keep its reason, one line.
        reason = " ".join(str(e).split())[:300]
        raise GQAError(f"could not load dataset {sources[0]!r} split {split!r}: {reason}") from e


def _column_names(ds: AnyDataset) -> list[str] | None:
    names = ds.column_names
    if names is None and isinstance(ds, datasets.IterableDataset):
        # Streaming datasets may not know their features until read: peek at one row.
        first = next(iter(ds.take(1)), None)
        names = list(first) if first is not None else []
    return names


def check_text_column(ds: AnyDataset, text_column: str, what: str = "dataset") -> None:
    """Raise a :class:`GQAError` naming the available columns when ``text_column`` is missing."""
    names = _column_names(ds)
    if names is not None and text_column not in names:
        raise GQAError(
            f"{what} has no column {text_column!r} (columns: {', '.join(names) or 'none'}); "
            "set data.text_column to the column that holds the text"
        )


def load_text_dataset(cfg: DataConfig, split: str | None = None) -> AnyDataset:
    """Load ``split`` (default ``cfg.split``) of ``cfg.source`` and check its text column.

    Returns a ``datasets.Dataset`` (or an ``IterableDataset`` when ``cfg.streaming``) with at least
    ``cfg.text_column``. Raises :class:`GQAError` when the source is missing or the column is absent.
    """
    split = split or cfg.split
    ds = _load_split(cfg, split)
    check_text_column(ds, cfg.text_column, what=f"data source {_describe(cfg)}")
    return ds


def _describe(cfg: DataConfig) -> str:
    return ", ".join(_as_list(cfg.source))


def split_train_eval(cfg: DataConfig) -> tuple[AnyDataset, AnyDataset | None]:
    """Load the training documents and the held-out documents (split by document, never mid-text).

    A named ``eval_split`` is loaded as is. Otherwise ``eval_documents`` (or ``eval_fraction`` of the
    documents, at least one) are held out of ``split``: a seeded random choice for map-style
    datasets, the first documents of the stream when streaming. ``eval_fraction=0`` and no
    ``eval_documents`` means no held-out set.
    """
    train = load_text_dataset(cfg)
    held: AnyDataset | None = None
    if cfg.eval_split:
        held = load_text_dataset(cfg, cfg.eval_split)
    elif isinstance(train, datasets.IterableDataset):
        if cfg.eval_documents is None and cfg.eval_fraction > 0:
            raise ConfigError(
                "recipe key data.eval_documents: a streamed dataset has no length for eval_fraction; "
                "set data.eval_documents (first N documents held out) or data.eval_split"
            )
        if cfg.eval_documents:
            held = train.take(cfg.eval_documents)
            train = train.skip(cfg.eval_documents)
    else:
        n = len(train)
        if cfg.eval_documents is not None:
            n_eval = cfg.eval_documents
        else:  # at least one document whenever a fraction is asked for
            n_eval = max(1, round(n * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        if n_eval:
            if n_eval >= n:
                raise GQAError(
                    f"data source {_describe(cfg)} has {n} document(s), too few to hold out {n_eval}; "
                    "add data, lower data.eval_fraction / data.eval_documents, or set data.eval_split"
                )
            parts = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
            train, held = parts["train"], parts["test"]
    if cfg.max_documents is not None:
        if isinstance(train, datasets.IterableDataset):
            train = train.take(cfg.max_documents)
        elif cfg.max_documents < len(train):
            train = train.select(range(cfg.max_documents))
    return train, held


# --------------------------------------------------------------------------------------------------
# Tokenization and packing
# --------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does to text (vocabulary, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # Slow tokenizers have no backend: their vocabulary is what we can see.
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _hash(f"{type(tokenizer).__name__}|{content}|eos={tokenizer.eos_token_id}")


def _tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, text_column: str, eos_id: int | None
) -> dict[str, list[list[int]]]:
    texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
    # add_special_tokens=False: packing places its own separator (EOS); a BOS per document would
    # land mid-block, which is not what pretraining-style packed data looks like.
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tail = [eos_id] if eos_id is not None else []
    ids = [row + tail for row in ids if row]  # empty documents add nothing, not even EOS
    return {"input_ids": ids}


def _pack_batch(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    flat = [tok for row in batch["input_ids"] for tok in row]
    n = len(flat) // block_size * block_size  # drop this batch's tail (< block_size tokens)
    return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}


def _pack_stream(rows: Iterator[dict[str, Any]], block_size: int) -> Iterator[dict[str, list[int]]]:
    """Exact packing for streams: carry the remainder from one document to the next."""
    buf: list[int] = []
    for row in rows:
        buf.extend(row["input_ids"])
        while len(buf) >= block_size:
            yield {"input_ids": buf[:block_size]}
            buf = buf[block_size:]


def tokenize_and_pack(
    dataset: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    text_column: str = "text",
    add_eos: bool = True,
    max_blocks: int | None = None,
    num_proc: int | None = None,
    desc: str = "tokenizing",
) -> AnyDataset:
    """Tokenize ``dataset[text_column]`` and pack it into rows of exactly ``block_size`` token ids.

    Each document is followed by EOS (``add_eos``), documents are concatenated and cut into
    blocks; the result has one column, ``input_ids`` (``block_size`` ints per row). Map-style
    datasets are cached by ``datasets`` under a fingerprint of (source, tokenizer, settings), so the
    same call on the same data is free the second time. ``max_blocks`` keeps the first blocks only.
    Raises :class:`GQAError` when the column is missing or the text is shorter than one block.
    """
    if block_size < 2:
        raise ConfigError(f"recipe key data.block_size: must be at least 2, got {block_size}")
    check_text_column(dataset, text_column)
    eos_id = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos_id is None:
        logger.warning("tokenizer has no EOS token; documents are packed without a separator")

    if isinstance(dataset, datasets.IterableDataset):
        tokenized = dataset.map(
            _tokenize_batch,
            batched=True,
            remove_columns=_column_names(dataset),
            fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos_id": eos_id},
        )
        # Generator-based packing carries remainders across documents (no per-batch loss).
        packed = datasets.IterableDataset.from_generator(
            _pack_stream, gen_kwargs={"rows": tokenized, "block_size": block_size}
        )
        return packed.take(max_blocks) if max_blocks is not None else packed

    settings = _hash(
        f"{_PACK_VERSION}|{tokenizer_fingerprint(tokenizer)}|{text_column}|{eos_id}|{block_size}"
    )
    base = dataset._fingerprint  # set by datasets for every map-style dataset
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos_id": eos_id},
        num_proc=num_proc,
        new_fingerprint=_hash(f"tok|{base}|{settings}"),
        desc=desc,
    )
    packed = tokenized.map(
        _pack_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={"block_size": block_size},
        num_proc=num_proc,
        new_fingerprint=_hash(f"pack|{base}|{settings}"),
        desc=f"packing into {block_size}-token blocks",
    )
    if len(packed) == 0:
        n_tokens = sum(len(r) for r in tokenized["input_ids"])
        raise GQAError(
            f"the text holds {n_tokens} tokens, fewer than one block of {block_size}; "
            "add data or lower data.block_size"
        )
    if max_blocks is not None and max_blocks < len(packed):
        packed = packed.select(range(max_blocks))
    return packed


def prepare_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_eval_blocks: int | None = None
) -> PackedData:
    """Load, split, tokenize and pack ``cfg`` for training: the one call the training loop makes."""
    train_docs, eval_docs = split_train_eval(cfg)
    kw = {"text_column": cfg.text_column, "add_eos": cfg.add_eos, "num_proc": cfg.num_proc}
    train = tokenize_and_pack(train_docs, tokenizer, cfg.block_size, desc="tokenizing train", **kw)
    held = None
    if eval_docs is not None:
        held = tokenize_and_pack(
            eval_docs, tokenizer, cfg.block_size, max_blocks=max_eval_blocks, desc="tokenizing held-out", **kw
        )
        if isinstance(held, datasets.IterableDataset):
            # The held-out set is small and read at every evaluation: materialise it once.
            held = datasets.Dataset.from_list(list(held))
            if len(held) == 0:
                raise GQAError(
                    f"held-out documents hold fewer tokens than one block of {cfg.block_size}; "
                    "raise data.eval_documents or lower data.block_size"
                )
    fp = _hash(f"{cfg.fingerprint()}|{tokenizer_fingerprint(tokenizer)}|{_PACK_VERSION}")
    return PackedData(train=train, eval=held, block_size=cfg.block_size, fingerprint=fp)
