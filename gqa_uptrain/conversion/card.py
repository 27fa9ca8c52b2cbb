"""The conversion's part of the model card: where the checkpoint came from, what was done to it
and by which method (credited to its paper), its head counts and KV-cache saving, what is known of
its quality before any measurement, and the command.

:func:`write_conversion_card` writes a converted checkpoint's first card; the generic parts
(loading section, section markers, validation) come from :mod:`gqa_uptrain.hub.card`, which knows
nothing of conversions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from ..hub.card import base_model_id, loading_section, scrub_paths, wrap_section
from ..io.locate import looks_like_repo_id
from ..io.outputs import format_bytes

if TYPE_CHECKING:
    from ..io.tensors import Source
    from .pipeline import ConversionResult

# ---------------------------------------------------------------------------------------------
# The source: its name, license and base model, as the converted card carries them over.
# ---------------------------------------------------------------------------------------------

# A Hub cache folder (huggingface_hub's snapshot_download) names the repo it holds.
_HUB_CACHE_DIR = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")
_HF_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<id>[^/?#\s]+/[^/?#\s]+)")


@dataclass
class SourceFacts:
    """What the converted card says about the checkpoint it was converted from."""

    display: str
    """The source as the card names it: its Hub id, else its file (GGUF) or folder name."""
    hub_id: str | None = None
    """The source's own Hub id, when known (a Hub source, or a folder in the Hub cache)."""
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    license_from: str | None = None
    base_model: list[str] = field(default_factory=list)
    base_model_from: str | None = None
    """Where ``base_model`` came from when it is not the source itself (None: it is the source)."""
    gguf_weight_type: str | None = None


def _hub_id_from_url(url: Any) -> str | None:
    m = _HF_URL.match(str(url or "").strip())
    return m.group("id") if m and looks_like_repo_id(m.group("id")) else None


def _hub_cache_id(folder: Path) -> str | None:
    for part in reversed(folder.parts):
        m = _HUB_CACHE_DIR.match(part)
        if m:
            hub = f"{m.group('owner')}/{m.group('name')}"
            return hub if looks_like_repo_id(hub) else None
    return None


def _source_card(folder: Path | None) -> ModelCardData | None:
    path = folder / "README.md" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return ModelCard(path.read_text(encoding="utf-8")).data
    except (ValueError, UnicodeDecodeError, OSError):  # a broken source card is no reason to fail
        return None


def _ids(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and looks_like_repo_id(v)]


def _gguf_bases(meta: dict[str, Any]) -> list[str]:
    """Hub ids of the base models a GGUF's ``general.base_model.{i}.*`` metadata names."""
    out = []
    for i in range(int(meta.get("general.base_model.count") or 0)):
        hub = _hub_id_from_url(meta.get(f"general.base_model.{i}.repo_url"))
        org, name = meta.get(f"general.base_model.{i}.organization"), meta.get(f"general.base_model.{i}.name")
        if hub is None and org and name and looks_like_repo_id(f"{org}/{name}".replace(" ", "-")):
            hub = f"{org}/{name}".replace(" ", "-")
        if hub:
            out.append(hub)
    return out


def source_facts(source: Source | None, name: str, config: dict[str, Any] | None = None) -> SourceFacts:
    """Name, license and base model of the source, from the most exact place that has them.

    License: the source's card (README.md), its config, or the GGUF's ``general.license``.
    ``base_model``: the source's own Hub id (a Hub source, a Hub-cache folder, a config
    ``_name_or_path`` that is one, a GGUF whose metadata links its Hub repo); failing that, the base
    model the GGUF metadata or the source's card names, recorded as such; else none (``gqa-export
    --base-model`` names it).
    """
    folder = source.folder if source is not None else None
    gguf = source.gguf_file if source is not None else None
    extra = source.extra if source is not None else {}
    meta: dict[str, Any] = extra.get("gguf_metadata") or {}
    card = _source_card(folder)

    hub_id = base_model_id(name, None if gguf else config)
    if hub_id is None and folder is not None:
        hub_id = _hub_cache_id(folder.resolve())
    if hub_id is None and gguf is not None:
        for key in ("general.source.repo_url", "general.repo_url", "general.source.url", "general.url"):
            hub_id = _hub_id_from_url(meta.get(key))
            if hub_id:
                break
        if hub_id is None and _ids(meta.get("general.source.huggingface.repository")):
            hub_id = str(meta["general.source.huggingface.repository"])
    if hub_id:
        display = f"{hub_id} ({gguf.name})" if gguf is not None else hub_id
    elif gguf is not None:
        display = gguf.name
    else:
        display = Path(name).expanduser().name or name

    facts = SourceFacts(display=display, hub_id=hub_id, gguf_weight_type=extra.get("gguf_weight_type"))
    for where, lic, lic_name, lic_link in (
        (
            "the source's model card",
            *(getattr(card, k, None) for k in ("license", "license_name", "license_link")),
        ),
        ("the source's config.json", (config or {}).get("license"), None, None),
        (
            "the GGUF metadata",
            meta.get("general.license"),
            meta.get("general.license.name"),
            meta.get("general.license.link"),
        ),
    ):
        if isinstance(lic, str) and lic.strip():
            facts.license, facts.license_from = lic.strip().lower(), where
            facts.license_name = lic_name if isinstance(lic_name, str) else None
            facts.license_link = lic_link if isinstance(lic_link, str) else None
            break

    if hub_id:
        facts.base_model = [hub_id]
    elif (
        card is not None
        and _ids(card.base_model)
        and getattr(card, "base_model_relation", None) == "quantized"
    ):
        facts.base_model = _ids(card.base_model)  # the source *is* that model, quantized
    elif _gguf_bases(meta):
        facts.base_model = _gguf_bases(meta)
        facts.base_model_from = "the base model the GGUF's metadata names for the model it holds"
    elif card is not None and _ids(card.base_model):
        facts.base_model = _ids(card.base_model)
        facts.base_model_from = "the base model the source's card names"
    return facts


# ---------------------------------------------------------------------------------------------
# The conversion section
# ---------------------------------------------------------------------------------------------

_GQA_PAPER = (
    "Ainslie et al. 2023, *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head "
    "Checkpoints*, arXiv:2305.13245"
)
# What each merge method does and where it comes from.
METHOD_CREDITS = {
    "mean": f"each group's key/value heads averaged into one, the conversion of the GQA paper ({_GQA_PAPER})",
    "first": f"each group keeps its first key/value head, an ablation in the GQA paper ({_GQA_PAPER}, Figure 4)",
    "random": f"new key/value heads drawn at random, an ablation in the GQA paper ({_GQA_PAPER}, Figure 4)",
    "aligned": "each group's shared key/value head fitted on calibration text to what the group's heads "
    "compute, with every member's map folded into its query and output weights: head alignment before "
    "merging after arXiv:2412.20677, with the principal-subspace fit of SVD initialisation (Yu et al. 2024; "
    "Palu, arXiv:2407.21118); not a method of the GQA paper",
}
GROUPING_CREDITS = {
    "contiguous": "groups are contiguous runs of heads, as in the GQA paper",
    "similarity": "heads grouped by how well they merge on calibration text, then permuted so each group is "
    "contiguous (QCQA, arXiv:2406.10247; align-then-merge, arXiv:2412.20677)",
}


def _method_credit(method: str) -> str:
    return METHOD_CREDITS.get(method, f"the `{method}` merge method (user-supplied; see its documentation)")


def _quality_note(r: ConversionResult) -> str:
    """What is known about the conversion's quality before any measurement of this checkpoint."""
    if r.method == "random":
        return (
            "**Not usable before uptraining.** Its key/value heads are random, so it does not model "
            "language until it is uptrained (`gqa-uptrain`)."
        )
    if r.num_kv_heads_after == r.num_kv_heads_before:
        return "No heads were merged: the model computes what the original did."
    # Figures: results/merging.md, SmolLM2-135M-Instruct 3 -> 1, held-out Python tutorial text.
    if r.num_kv_heads_after == 1 and r.extra.get("refined_modules"):
        return (
            f"**Measure before use.** Merging {r.num_kv_heads_before} key/value heads into one loses part of "
            "what they computed; the calibrated merge with layer-wise refinement recovers most of it before "
            "any uptraining: on SmolLM2-135M-Instruct (3 → 1 heads) gqa-uptrain measured held-out perplexity "
            "19,490 after mean pooling, 116 after the `aligned` fit alone and 16.8 after refinement (65,536 "
            "calibration tokens; 23.3 with 8,192), against 11.6 for the original. Measure it against the "
            "original (`gqa-eval`) and uptrain it (`gqa-uptrain`) to close the rest."
        )
    if r.num_kv_heads_after == 1:
        return (
            f"**Not usable before uptraining.** Merging {r.num_kv_heads_before} key/value heads into one is "
            "known to need it: the GQA paper recovers multi-query models only by uptraining, and on "
            "SmolLM2-135M-Instruct (3 → 1 heads) gqa-uptrain measured held-out perplexity 19,490 after mean "
            "pooling and 116 after `aligned` without refinement, against 11.6 for the original. Uptrain it "
            "(`gqa-uptrain`) and measure it (`gqa-eval`) before use."
        )
    return (
        "**Quality not measured at conversion.** Merged heads lose part of what the separate heads computed, "
        "and how much depends on the model: measure it against the original with `gqa-eval` before use, and "
        "uptrain it (`gqa-uptrain`; the paper uses 5% of the pretraining steps) to recover it."
    )


def _weights_note(r: ConversionResult, facts: SourceFacts) -> str | None:
    if not facts.gguf_weight_type:
        return None
    note = f"Weights dequantized from the GGUF's {facts.gguf_weight_type} tensors and written in {r.dtype}"
    if facts.gguf_weight_type.startswith(("Q", "I", "T")) and r.dtype == "float32":
        note += " (asked for with `--dtype float32`: twice the size of bfloat16, with no more information)"
    return note + "."


def _range_note(r: ConversionResult) -> str | None:
    """The merged attention weights' largest magnitude against the source's: what bf16 and 8-bit
    deployment formats need kept in range (a fit folded into weights can blow it up)."""
    span = r.extra.get("attention_max_abs")
    if not span or not span.get("source"):
        return None
    ratio = span["output"] / span["source"]
    verdict = (
        "within the source's range, which bf16 and 8-bit formats (llama.cpp's Q8_0) keep about as well as "
        "the original's"
        if ratio <= 10
        else "**far outside the source's range: bf16 and 8-bit formats may not keep it; measure before deploying**"
    )
    return (
        f"**Weight range:** the largest merged attention weight is {span['output']:.3g} against "
        f"{span['source']:.3g} in the source ({ratio:.2f}×), {verdict}. `gqa-eval PATH --baseline SOURCE "
        "--round-trip bf16 --round-trip q8_0` measures how far perplexity moves when the weights are rounded."
    )


def conversion_section(r: ConversionResult, facts: SourceFacts | None = None) -> str:
    """Markdown describing a conversion: source, method and its origin, head counts, KV-cache saving,
    what is known of its quality, and the command."""
    facts = facts or SourceFacts(display=Path(r.source).name or r.source)
    kind = "MQA" if r.num_kv_heads_after == 1 else f"GQA-{r.num_kv_heads_after}"
    grouping = r.extra.get("grouping", "contiguous")
    lines = [
        f"## Conversion to {kind}",
        "",
        f"Converted from `{facts.display}` ({r.architecture}) with gqa-uptrain, merging the key/value heads "
        f"of each attention layer with the **{r.method}** method: {_method_credit(r.method)}. "
        f"Grouping `{grouping}`: {GROUPING_CREDITS.get(grouping, 'user-supplied')}.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| query heads | {r.num_heads} | {r.num_heads} |",
        f"| key/value heads | {r.num_kv_heads_before} | {r.num_kv_heads_after} |",
        f"| head dim | {r.head_dim} | {r.head_dim} |",
        f"| parameters | {r.params_before:,} | {r.params_after:,} |",
        f"| KV cache per token ({r.dtype}) | {format_bytes(r.kv_bytes_per_token_before)} | "
        f"{format_bytes(r.kv_bytes_per_token_after)} |",
        "",
        f"The KV cache is {100 * r.kv_reduction:.1f}% smaller.",
        "",
        _quality_note(r),
    ]
    weights = _weights_note(r, facts)
    if weights:
        lines += ["", weights]
    span = _range_note(r)
    if span:
        lines += ["", span]
    if facts.license:
        lines += ["", f"License `{facts.license}`, carried over from {facts.license_from}."]
    if facts.base_model_from:
        lines += [
            "",
            f"`base_model` ({', '.join(facts.base_model)}) is {facts.base_model_from}; the source's own Hub "
            "id is not known here (`gqa-export --base-model OWNER/NAME` sets it).",
        ]
    if r.extra.get("card_notes"):
        lines += ["", *r.extra["card_notes"]]
    if r.needs_trust_remote_code:
        lines += [
            "",
            f"Transformers has no grouped-query attention for {r.architecture}, so this checkpoint ships "
            "its modelling code. Load it with `trust_remote_code=True` (or call "
            "`gqa_uptrain.register_auto_classes()` first, which registers the same classes):",
            "",
            "```python",
            "from transformers import AutoModel  # or AutoModelForCausalLM / AutoModelForSeq2SeqLM",
            "model = AutoModel.from_pretrained(PATH, trust_remote_code=True)",
            "```",
        ]
    if r.command:
        lines += ["", "Command:", "", "```bash", r.command, "```"]
    return scrub_paths("\n".join(lines)) + "\n"


def write_conversion_card(
    folder: str | Path,
    r: ConversionResult,
    config: dict[str, Any] | None = None,
    *,
    source: Source | None = None,
) -> ModelCard:
    """Write a fresh model card for a converted checkpoint.

    ``config`` is the source's config and ``source`` the open source (its card, GGUF metadata and
    folder give the license and base model, see :func:`source_facts`). The card's loading section
    reads the output's own config.json when it is already written in ``folder``.
    """
    folder = Path(folder)
    facts = source_facts(source, r.source, config)
    tags = ["gqa", "grouped-query-attention", r.model_type, "gqa-uptrain"]
    if r.num_kv_heads_after == 1:
        tags.insert(1, "mqa")
    bases = facts.base_model
    data = ModelCardData(
        library_name="transformers",
        license=facts.license,
        license_name=facts.license_name,
        license_link=facts.license_link,
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        base_model_relation="finetune" if bases else None,
        tags=tags,
        pipeline_tag=None if r.model_type in ("bert", "bert_gqa") else "text-generation",
    )
    out_config = config or {}
    if (folder / "config.json").is_file():
        out_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    title = Path(r.output).name
    body = (
        f"# {title}\n\n"
        + wrap_section("conversion", conversion_section(r, facts))
        + "\n"
        + wrap_section("loading", loading_section(out_config, r.needs_trust_remote_code))
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(folder / "README.md")
    return card
