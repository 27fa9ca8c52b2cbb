"""Shared builders for the uptraining tests: real text, a real (tiny) BPE tokenizer, tiny GQA models.

Everything is built offline in a temporary folder: the text is Debian's python3.11-doc
reStructuredText, the tokenizer a byte-level BPE trained on it, the models random tiny Llamas with
fewer K/V heads than query heads (what ``gqa-convert`` produces).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from _assets import require_asset

DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def copy_docs(dest: Path, max_bytes: int = 300_000, subdir: str = "library") -> Path:
    """Copy sorted python docs .rst.txt files into ``dest`` until ``max_bytes`` of text."""
    src = DOCS / subdir
    require_asset(src.is_dir(), "python3.11-doc is not installed (scripts/setup.sh installs it)")
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in sorted(src.glob("*.rst.txt")):
        size = f.stat().st_size
        if size > 40_000:  # many small files: a useful number of documents for splitting
            continue
        shutil.copy(f, dest / f.name)
        total += size
        if total >= max_bytes:
            break
    return dest


def build_tokenizer(text_dir: Path, out: Path, vocab_size: int = 512):
    """Train a byte-level BPE on the files of ``text_dir`` and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in sorted(text_dir.iterdir())], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def build_model(
    out: Path, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0
):
    """Save a random tiny Llama with ``kv_heads`` K/V heads (and ``tokenizer``) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def build_world(root: Path) -> Path:
    """Real text, a BPE tokenizer trained on it, a tiny GQA student and a tiny MHA 'original' in ``root``."""
    text = copy_docs(root / "text", max_bytes=150_000)
    tok = build_tokenizer(text, root / "tok", vocab_size=384)
    build_model(root / "student", tok, kv_heads=2, seed=0)
    build_model(root / "teacher", tok, kv_heads=4, seed=1)
    return root


def tiny_recipe(world: Path, out: Path, **sections) -> dict:
    """A 12-step recipe over the world of :func:`build_world`; ``sections`` update its sections."""
    data = {
        "model": {"path": str(world / "student")},
        "data": {
            "source": str(world / "text"),
            "block_size": 32,
            "eval_documents": 2,
            "cache_dir": str(world / "cache"),
        },
        "optim": {"lr": 3e-3, "batch_size": 4, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 2},
        "budget": {"steps": 12},
        "eval": {"every": 0, "max_blocks": 16},
        "checkpoint": {"every": 4, "keep_last": 2},
        "output": {"dir": str(out), "log_with": [], "log_every": 1},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data
