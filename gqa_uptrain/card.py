"""Model cards (README.md with YAML front matter) for converted and uptrained checkpoints.

The card is built with ``huggingface_hub.ModelCard`` so the Hub parses it. Its body is a list of
named sections; later steps (uptraining, evaluation, export) add or replace their own section
with :func:`update_card` and leave the others alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import looks_like_repo_id

if TYPE_CHECKING:
    from .conversion import ConversionResult

_SECTION = re.compile(r"<!-- gqa-uptrain:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /gqa-uptrain:(?P=name) -->\n?", re.S)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def base_model_id(source: str, config: dict[str, Any] | None = None) -> str | None:
    """The Hub id of the original model, when it can be known."""
    if looks_like_repo_id(source) and not Path(source).exists():
        return source
    name = (config or {}).get("_name_or_path", "")
    return name if looks_like_repo_id(str(name)) and not Path(str(name)).exists() else None


def conversion_section(r: ConversionResult) -> str:
    """Markdown describing a conversion: method, head counts, KV-cache saving, command."""
    kind = "MQA" if r.num_kv_heads_after == 1 else f"GQA-{r.num_kv_heads_after}"
    lines = [
        f"## Conversion to {kind}",
        "",
        f"Converted from `{r.source}` ({r.architecture}) with gqa-uptrain: "
        f"the key/value heads of each attention layer were merged with the **{r.method}** method "
        "(Ainslie et al. 2023, *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head "
        "Checkpoints*, arXiv:2305.13245).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| query heads | {r.num_heads} | {r.num_heads} |",
        f"| key/value heads | {r.num_kv_heads_before} | {r.num_kv_heads_after} |",
        f"| head dim | {r.head_dim} | {r.head_dim} |",
        f"| parameters | {r.params_before:,} | {r.params_after:,} |",
        f"| KV cache per token ({r.dtype}) | {_fmt_bytes(r.kv_bytes_per_token_before)} | "
        f"{_fmt_bytes(r.kv_bytes_per_token_after)} |",
        "",
        f"The KV cache is {100 * r.kv_reduction:.1f}% smaller. Merged heads lose some of what the "
        "separate heads computed: the paper recovers quality by *uptraining* for a few percent of the "
        "original pretraining steps (`gqa-uptrain`).",
    ]
    if r.extra.get("card_notes"):
        lines += ["", *r.extra["card_notes"]]
    if r.needs_trust_remote_code:
        lines += [
            "",
            f"Transformers has no grouped-query attention for {r.architecture}, so this checkpoint ships "
            "its modelling code. Load it with `trust_remote_code=True` (or `import gqa_uptrain` first, "
            "which registers the same classes):",
            "",
            "```python",
            "from transformers import AutoModel  # or AutoModelForCausalLM / AutoModelForSeq2SeqLM",
            "model = AutoModel.from_pretrained(PATH, trust_remote_code=True)",
            "```",
        ]
    if r.command:
        lines += ["", "Command:", "", "```bash", r.command, "```"]
    return "\n".join(lines) + "\n"


def _wrap(name: str, body: str) -> str:
    return f"<!-- gqa-uptrain:{name} -->\n{body.rstrip()}\n<!-- /gqa-uptrain:{name} -->\n"


def update_card(
    folder: str | Path,
    section: str,
    markdown: str,
    *,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelCard:
    """Add or replace section ``section`` of ``folder/README.md`` and merge metadata into its YAML.

    ``datasets`` and ``tags`` are added to the front matter's lists; ``metadata`` keys are set
    (e.g. ``eval_results``-derived ``model-index``). Returns the saved card.
    """
    path = Path(folder) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8")) if path.exists() else ModelCard.from_template(ModelCardData())
    data = card.data
    for key, values in (("datasets", datasets), ("tags", tags)):
        if values:
            current = list(getattr(data, key, None) or [])
            setattr(data, key, current + [v for v in values if v not in current])
    for k, v in (metadata or {}).items():
        setattr(data, k, v)
    text = card.text
    block = _wrap(section, markdown)
    if any(m.group("name") == section for m in _SECTION.finditer(text)):
        text = _SECTION.sub(lambda m: block if m.group("name") == section else m.group(0), text)
    else:
        text = text.rstrip() + "\n\n" + block
    new = ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")
    new.save(path)
    return new


def write_conversion_card(folder: str | Path, r: ConversionResult, config: dict[str, Any] | None = None) -> ModelCard:
    """Write a fresh model card for a converted checkpoint."""
    tags = ["gqa", "grouped-query-attention", r.model_type, "gqa-uptrain"]
    if r.num_kv_heads_after == 1:
        tags.insert(1, "mqa")
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model_id(r.source, config),
        base_model_relation="finetune" if base_model_id(r.source, config) else None,
        tags=tags,
        pipeline_tag=None if r.model_type in ("bert", "bert_gqa") else "text-generation",
    )
    title = Path(r.output).name
    body = f"# {title}\n\n" + _wrap("conversion", conversion_section(r))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(Path(folder) / "README.md")
    return card
