"""The recipe's ``data:`` section: where text comes from and how it becomes training blocks.

Light on purpose (standard library only): recipes are parsed and checked before torch or
``datasets`` load. The loading and packing itself is :mod:`gqa_uptrain.data.text`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training blocks (the recipe's ``data:`` section)."""

    source: str | list[str] = ""
    """Hub dataset id, or local file(s) / folder(s) / glob(s) of text, JSON lines, JSON, Parquet or CSV."""
    name: str | None = None
    """Hub dataset configuration (the second argument of ``datasets.load_dataset``)."""
    split: str = "train"
    """Split to train on (Hub datasets; local files always form one ``train`` split)."""
    text_column: str = "text"
    """Column holding the raw text."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole (Hub datasets and large local files)."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit)."""
    eval_split: str | None = None
    """A separate split to hold out for evaluation (e.g. ``validation``); else a part of ``split``."""
    eval_fraction: float = 0.05
    """Fraction of the documents of ``split`` held out for evaluation when there is no ``eval_split``."""
    eval_documents: int | None = None
    """Hold out this many documents instead of ``eval_fraction`` (the first ones when streaming)."""
    max_documents: int | None = None
    """Use at most this many training documents (quick runs, demos)."""
    block_size: int = 1024
    """Tokens per packed training block (sequence length)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token after every document before packing."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """For plain-text files: one document per file, per blank-line paragraph, or per line."""
    seed: int = 0
    """Seed of the document-level train / held-out split."""
    num_proc: int | None = None
    """Processes for tokenization (``None``: one)."""
    cache_dir: str | None = None
    """Where ``datasets`` caches downloads and tokenized data (``None``: its default cache)."""

    def fingerprint(self) -> str:
        """A short stable hash of everything that decides which documents are read and how."""
        relevant = {k: v for k, v in asdict(self).items() if k not in ("num_proc", "cache_dir")}
        return _hash(json.dumps(relevant, sort_keys=True, default=str))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
