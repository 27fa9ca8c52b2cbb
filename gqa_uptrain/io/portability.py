"""config.json and tokenizer_config.json that load the same in transformers 4.x and 5.x.

transformers 5 writes RoPE settings only as ``rope_parameters`` (``rope_theta``, ``rope_type``,
``partial_rotary_factor`` and the scaling keys in one dict) and names its generic fast tokenizer
``TokenizersBackend``. transformers 4.x, which llama.cpp's ``convert_hf_to_gguf.py`` pins, reads
neither: it takes RoPE's base from a top-level ``rope_theta`` (and silently uses 10000 without it),
the rotary fraction from a top-level ``partial_rotary_factor`` and scaling from ``rope_scaling``,
and refuses the unknown tokenizer class outright. 5.x still reads all the 4.x keys (its config
classes fold them back into ``rope_parameters``), so writing both forms loads the same model in
both.

transformers 5 also saves the flags a tokenizer was *loaded* with (``is_local``,
``local_files_only``) into ``tokenizer_config.json``, and a tokenizer rebuilt from GGUF metadata
gets the "no limit" ``model_max_length`` sentinel (1e30). Neither belongs in a published checkpoint:
the first says how this machine loaded it, the second loses the context length.

:func:`make_folder_portable` applies all of this to a saved checkpoint folder; the converter and
the uptraining's final save call it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Keys transformers 5 saves from the from_pretrained call rather than from the tokenizer: they
# describe how this machine loaded it (offline, from a local folder), not the tokenizer.
LOADING_FLAGS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "use_auth_token",
    "revision",
    "subfolder",
    "_commit_hash",
    "name_or_path",
    "gguf_file",
    "trust_remote_code",
)
# Tokenizer classes of transformers 5 that 4.x does not have. With a tokenizer.json beside them
# they are all the generic fast tokenizer, which both versions call PreTrainedTokenizerFast.
V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend", "SentencePieceBackend", "PythonBackend")
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# transformers' VERY_LARGE_INTEGER, what a tokenizer gets when nothing says its length.
NO_LENGTH_SENTINEL = int(1e30)
# RoPE keys 4.x reads at the top level of the config rather than in rope_scaling.
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with the transformers 4.x form of its RoPE settings beside ``rope_parameters``.

    Adds the top-level ``rope_theta`` (and ``partial_rotary_factor`` where set) that 4.x reads, and,
    for a scaled RoPE (``rope_type`` other than ``default``), ``rope_scaling`` with the remaining keys
    and the legacy ``type``. transformers 5 reads ``rope_scaling`` *instead of* ``rope_parameters``
    and fills ``rope_theta``/``partial_rotary_factor`` back in from the top level, so it rebuilds the
    same dict. Keys already present are kept. Configs nested by layer type (``{"full_attention":
    {...}, "sliding_attention": {...}}``) get only the top-level ``rope_theta`` of full attention:
    a flat ``rope_scaling`` would replace the nested dict in 5.x. ``_name_or_path`` (the folder a
    4.x-saved source was loaded from) is dropped.
    """
    out = dict(config)
    # Where the source was loaded from (transformers 4.x saved it): a path of that machine, read by
    # neither version when loading.
    out.pop("_name_or_path", None)
    for key in ("text_config", "decoder"):  # composite configs carry the RoPE of their sub-config
        if isinstance(out.get(key), dict):
            out[key] = portable_config(out[key])
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return out
    if all(isinstance(v, dict) for v in rope.values()):
        full = rope.get("full_attention")
        if isinstance(full, dict) and "rope_theta" in full:
            out.setdefault("rope_theta", full["rope_theta"])
        return out
    for key in _TOP_LEVEL_ROPE_KEYS:
        if key in rope:
            out.setdefault(key, rope[key])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and not out.get("rope_scaling"):
        scaling = {k: v for k, v in rope.items() if k not in _TOP_LEVEL_ROPE_KEYS}
        scaling["rope_type"] = rope_type
        scaling["type"] = rope_type  # the name transformers before 4.45 read
        out["rope_scaling"] = scaling
    return out


def _max_positions(config: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def portable_tokenizer_config(
    tok_config: dict[str, Any],
    *,
    has_tokenizer_json: bool,
    model_max_length: int | None = None,
) -> dict[str, Any]:
    """A copy of ``tokenizer_config.json``'s content that 4.x and 5.x load alike, with no loading flags.

    ``has_tokenizer_json``: whether a ``tokenizer.json`` sits beside it (a 5.x-only class is then
    renamed to :data:`PORTABLE_TOKENIZER_CLASS`). ``model_max_length``: the length to write in place
    of the 1e30 "no limit" sentinel (None keeps the sentinel).
    """
    out = {k: v for k, v in tok_config.items() if k not in LOADING_FLAGS}
    cls = out.get("tokenizer_class")
    if cls in V5_ONLY_TOKENIZER_CLASSES:
        if has_tokenizer_json:
            out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        else:
            logger.warning(
                "tokenizer_config.json names %s, which transformers 4.x does not have, and there is no "
                "tokenizer.json to load it as %s: it will load in transformers 5 only",
                cls,
                PORTABLE_TOKENIZER_CLASS,
            )
    length = out.get("model_max_length")
    if model_max_length and isinstance(length, int | float) and length >= NO_LENGTH_SENTINEL:
        out["model_max_length"] = model_max_length
    return out


def make_folder_portable(folder: str | Path, *, fill_model_max_length: bool = False) -> None:
    """Rewrite ``folder``'s config.json and tokenizer_config.json in their portable form (in place).

    ``fill_model_max_length``: replace a "no limit" ``model_max_length`` with the model's
    ``max_position_embeddings``; for tokenizers this toolkit rebuilt (from GGUF metadata), not for
    ones copied from a source that chose the sentinel itself. Missing files are skipped.
    """
    folder = Path(folder)
    config: dict[str, Any] = {}
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        new = portable_config(config)
        if new != config:
            config_path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        new_tok = portable_tokenizer_config(
            tok,
            has_tokenizer_json=(folder / "tokenizer.json").is_file(),
            model_max_length=_max_positions(config) if fill_model_max_length else None,
        )
        if new_tok != tok:
            tok_path.write_text(json.dumps(new_tok, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
