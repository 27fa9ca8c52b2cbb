"""How much of a text a tokenizer really covers: the share of its tokens that carry no meaning.

Calibration fits each merged attention layer to what the model computes on the calibration text.
Text the tokenizer does not cover (binary data read as text, a script the vocabulary lacks) becomes
unknown tokens or byte-fallback tokens (single raw bytes of a character the vocabulary has no
token for), on which the model computes nothing like what it computes on real text: a fit on them
does not help. Measured here, warned about by the caller.

Light on purpose: the standard library only; the tokenizer is whatever ``transformers`` loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The replacement character: what decoding a lone byte of a multi-byte character gives, and what
# reading a binary file as UTF-8 with ``errors="replace"`` puts in place of every invalid byte.
REPLACEMENT = "\ufffd"

# Above this share of unknown or byte-fallback tokens the calibration text is worth a warning.
# Measured with a byte-level BPE trained on English (tests/test_calibration_text.py): English text
# under 2%, random bytes 71%, Chinese 100%.
POOR_COVERAGE_SHARE = 0.10


@dataclass(frozen=True)
class Coverage:
    """What :func:`token_coverage` measured."""

    tokens: int
    unknown: int  # the tokenizer's unknown token
    byte_fallback: int  # tokens that decode to no whole character (a raw byte, or U+FFFD itself)

    @property
    def share(self) -> float:
        """Share of the tokens that are unknown or byte-fallback, 0..1."""
        return (self.unknown + self.byte_fallback) / self.tokens if self.tokens else 0.0


def token_coverage(tokenizer: Any, ids: Sequence[int]) -> Coverage:
    """Count the unknown and byte-fallback tokens among ``ids`` (produced by ``tokenizer``).

    A byte-fallback token is one whose text alone is not a whole character: byte-level BPEs
    (GPT-2, Llama-3, SmolLM2) and SentencePiece's byte fallback (Llama-2, Mistral) spell a character
    they have no token for as its UTF-8 bytes, one token each, and each decodes to U+FFFD on its own.
    Each distinct id is decoded once, so this costs one ``decode`` per distinct token.
    """
    counts = Counter(int(i) for i in ids)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unknown = counts.get(unk_id, 0) if unk_id is not None else 0
    fallback = 0
    for tid, n in counts.items():
        if tid == unk_id:
            continue
        if REPLACEMENT in tokenizer.decode([tid], skip_special_tokens=False):
            fallback += n
    return Coverage(sum(counts.values()), unknown, fallback)


def coverage_warning(coverage: Coverage, what: str, threshold: float = POOR_COVERAGE_SHARE) -> str | None:
    """A one-line warning when ``coverage`` says the text cannot help calibration (else None).

    ``what`` names the text (e.g. the ``--calibration`` argument).
    """
    if coverage.tokens == 0 or coverage.share <= threshold:
        return None
    parts = []
    if coverage.unknown:
        parts.append(f"{coverage.unknown / coverage.tokens:.0%} unknown")
    if coverage.byte_fallback:
        parts.append(f"{coverage.byte_fallback / coverage.tokens:.0%} byte-fallback")
    return (
        f"--calibration {what}: {coverage.share:.0%} of its {coverage.tokens:,} tokens are unknown or "
        f"byte-fallback tokens ({', '.join(parts)}): the tokenizer does not cover this text (binary data, or "
        "a script the model was not trained on), so calibrating on it will not help; give text in the "
        "model's language(s)"
    )
