"""Model cards (README.md with YAML front matter) for converted and uptrained checkpoints.

The card is built with ``huggingface_hub.ModelCard`` so the Hub parses it. Its body is a list of
named sections; later steps (uptraining, evaluation, export) add or replace their own section
with :func:`update_card` and leave the others alone.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import looks_like_repo_id

if TYPE_CHECKING:
    from ..conversion.pipeline import ConversionResult
    from ..io.checkpoint import Source

_SECTION = re.compile(
    r"<!-- gqa-uptrain:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /gqa-uptrain:(?P=name) -->\n?", re.S
)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def base_model_id(source: str, config: dict[str, Any] | None = None) -> str | None:
    """The Hub id of the original model, when it can be known from its name or its config."""
    if looks_like_repo_id(source) and not Path(source).exists():
        return source
    name = (config or {}).get("_name_or_path", "")
    return name if looks_like_repo_id(str(name)) and not Path(str(name)).exists() else None


# ---------------------------------------------------------------------------------------------
# The source: its name, license and base model, as the converted card carries them over.
# ---------------------------------------------------------------------------------------------

# A Hub cache folder (huggingface_hub's snapshot_download) names the repo it holds.
_HUB_CACHE_DIR = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")
_HF_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<id>[^/?#\s]+/[^/?#\s]+)")
# POSIX absolute paths (and ~ paths) in card text: not after a word character, ':' or '/', so URLs,
# owner/name ids and "key/value" are left alone.
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?:~/|/)(?:[\w.+@-]+/)*[\w.+@-]*")


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (the card never names a
    folder of the machine that wrote it: ``/home/me/.venv/.../x.gguf`` becomes ``x.gguf``)."""

    def last(m: re.Match[str]) -> str:
        parts = [p for p in m.group(0).split("/") if p and p != "~"]
        return parts[-1] if parts else m.group(0)

    return _ABS_PATH.sub(last, text)


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
    if r.num_kv_heads_after == 1:
        return (
            f"**Not usable before uptraining.** Merging {r.num_kv_heads_before} key/value heads into one is "
            "known to need it: the GQA paper recovers multi-query models only by uptraining, and on "
            "SmolLM2-135M-Instruct (3 → 1 heads) gqa-uptrain measured held-out perplexity 15,387 after mean "
            "pooling and 93.4 after `aligned`, against 12.1 for the original. Uptrain it (`gqa-uptrain`) and "
            "measure it (`gqa-eval`) before use."
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
        f"| KV cache per token ({r.dtype}) | {_fmt_bytes(r.kv_bytes_per_token_before)} | "
        f"{_fmt_bytes(r.kv_bytes_per_token_after)} |",
        "",
        f"The KV cache is {100 * r.kv_reduction:.1f}% smaller.",
        "",
        _quality_note(r),
    ]
    weights = _weights_note(r, facts)
    if weights:
        lines += ["", weights]
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
    return scrub_paths("\n".join(lines)) + "\n"


def loading_section(config: dict[str, Any], needs_remote_code: bool) -> str:
    """Markdown saying which tools load the checkpoint: stock transformers 4.x/5.x, llama.cpp and peft
    for native families; transformers with remote code only for the others."""
    arch = (config.get("architectures") or ["this architecture"])[0]
    auto = _auto_class(config)
    if needs_remote_code:
        return (
            "\n".join(
                [
                    "## Loading",
                    "",
                    f"- **transformers, with remote code only:** `{auto}.from_pretrained(PATH, trust_remote_code=True)` "
                    "(or `import gqa_uptrain` first). Stock transformers has no grouped-query attention for this family.",
                    f"- **Not llama.cpp:** its `convert_hf_to_gguf.py` refuses `{arch}`, an architecture it does not "
                    "know, as do other tools that load only stock transformers architectures.",
                ]
            )
            + "\n"
        )
    return (
        "\n".join(
            [
                "## Loading",
                "",
                f"- **transformers 5.x and 4.x** (tested with 5.24 and 4.57): `{auto}.from_pretrained(PATH)` and "
                "`AutoTokenizer.from_pretrained(PATH)`, no remote code. `config.json` carries both versions' RoPE "
                "keys and the tokenizer a class both have.",
                "- **llama.cpp:** `python convert_hf_to_gguf.py PATH --outfile model.gguf`, with the converter and "
                "requirements of llama.cpp's own repository (it pins transformers 4.x); the GGUF has the reduced "
                f"K/V head count. gqa-uptrain tests this for Llama, Mistral and Qwen2 outputs; llama.cpp refuses "
                f"architectures it does not know (this one is `{arch}`).",
                '- **peft:** LoRA adapters attach as on the original, e.g. `get_peft_model(model, LoraConfig(target_modules="all-linear"))`.',
            ]
        )
        + "\n"
    )


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
    new = apply_card_update(
        load_card(folder), section, markdown, datasets=datasets, tags=tags, metadata=metadata
    )
    new.save(Path(folder) / "README.md")
    return new


def load_card(folder: str | Path) -> ModelCard:
    """``folder/README.md`` parsed, or the blank huggingface_hub template when there is none."""
    path = Path(folder) / "README.md"
    return (
        ModelCard(path.read_text(encoding="utf-8"))
        if path.exists()
        else ModelCard.from_template(ModelCardData())
    )


def apply_card_update(
    card: ModelCard,
    section: str,
    markdown: str,
    *,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelCard:
    """A copy of ``card`` with section ``section`` added or replaced and the metadata merged.

    What :func:`update_card` saves, without touching any file (dry runs, and callers that apply
    several sections before writing once).
    """
    data = copy.deepcopy(card.data)
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
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")


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
        + _wrap("conversion", conversion_section(r, facts))
        + "\n"
        + _wrap("loading", loading_section(out_config, r.needs_trust_remote_code))
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(folder / "README.md")
    return card


# ---------------------------------------------------------------------------------------------
# Evaluation results (``gqa-eval --json``) → ``model-index``; usage section; validation.
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalEntry:
    """One model's perplexity, as read from ``gqa-eval`` JSON."""

    model: str
    perplexity: float
    dataset: str
    split: str | None = None
    tokens_scored: int | None = None
    role: str | None = None  # gqa-eval: "model" (the one evaluated) or "baseline"
    num_kv_heads: int | None = None
    kv_bytes_per_token: int | None = None


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _dataset_name(*candidates: Any) -> tuple[str | None, str | None]:
    """(dataset, split) from the first candidate that names one: a string or a dict."""
    for c in candidates:
        if isinstance(c, str) and c:
            return c, None
        if isinstance(c, dict):
            for key in ("id", "name", "source", "path"):
                v = c.get(key)
                if isinstance(v, list) and v:
                    v = ", ".join(str(x) for x in v)
                if isinstance(v, str) and v:
                    split = c.get("split") if isinstance(c.get("split"), str) else None
                    if split and c.get("held_out"):
                        split += " (held-out part)"  # gqa-eval --held-out: uptraining's held-out documents
                    return v, split
    return None, None


def parse_eval_json(data: Any, source: str = "eval JSON") -> list[EvalEntry]:
    """The perplexity results in ``gqa-eval --json`` output, one per model.

    What ``gqa-eval --json`` writes: ``{"models": [{"name", "role", "kv_cache": {...},
    "perplexity": {"perplexity", "tokens_scored", ...} or null, ...}], "data": {"source", "split",
    "held_out", ...}, ...}``. Also accepted, the documented minimal schema
    ``{"model": NAME, "perplexity": P, "dataset": D}`` and lists of such objects; ``dataset`` may be
    a string or an object with ``id``/``name``/``source``/``path`` and ``split``.

    Entries without a perplexity (speed-only runs) are skipped. Raises :class:`ConfigError` when
    nothing usable is found.
    """
    if isinstance(data, dict):
        entries = next((data[k] for k in ("models", "results") if isinstance(data.get(k), list)), [data])
        shared_dataset = data.get("dataset") or data.get("data")
    elif isinstance(data, list):
        entries, shared_dataset = data, None
    else:
        raise ConfigError(
            f"{source} is not a gqa-eval JSON object or list; pass the file `gqa-eval --json` wrote"
        )
    out = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        ppl_field = e.get("perplexity")
        ppl_obj = ppl_field if isinstance(ppl_field, dict) else {}
        ppl = _number(ppl_obj.get("perplexity") if ppl_obj else ppl_field)
        if ppl is None:
            continue
        model = e.get("model") or e.get("name")
        dataset, split = _dataset_name(e.get("dataset"), ppl_obj.get("dataset"), shared_dataset)
        split = split or next((x for x in (e.get("split"), ppl_obj.get("split")) if isinstance(x, str)), None)
        kv = e.get("kv_cache") if isinstance(e.get("kv_cache"), dict) else {}
        out.append(
            EvalEntry(
                model=str(model or "model"),
                perplexity=ppl,
                dataset=dataset or "held-out text",
                split=split,
                tokens_scored=_int(ppl_obj.get("tokens_scored", e.get("tokens_scored"))),
                role=e.get("role") if isinstance(e.get("role"), str) else None,
                num_kv_heads=_int(kv.get("num_kv_heads")),
                kv_bytes_per_token=_int(kv.get("bytes_per_token")),
            )
        )
    if not out:
        raise ConfigError(
            f"{source} holds no perplexity result (expected e.g. "
            '{"model": ..., "perplexity": ..., "dataset": ...}); run gqa-eval with --data and --json'
        )
    return out


def pick_eval_entry(entries: list[EvalEntry], folder: str | Path, repo_id: str | None = None) -> EvalEntry:
    """The entry that measured ``folder``: its name (what gqa-eval was given) is this folder's path
    (relative paths resolved from the current folder) or ``repo_id``.

    Raises :class:`ConfigError` when no entry is this model, rather than publish another model's
    numbers as this model's.
    """
    target = Path(folder).resolve()

    def same(name: str) -> bool:
        if repo_id and name == repo_id:
            return True
        try:
            return Path(name).expanduser().resolve() == target
        except (OSError, RuntimeError):
            return False

    matches = [e for e in entries if same(e.model)]
    if matches:
        return matches[0]
    names = ", ".join(sorted({e.model for e in entries}))
    raise ConfigError(
        f"the eval JSON measures {names}, not {folder}; run gqa-eval on {folder} (or {repo_id or 'its Hub id'}) "
        "and pass that JSON"
    )


def eval_results(entry: EvalEntry) -> list[EvalResult]:
    """``model-index`` results for one model: its perplexity on its dataset."""
    hub_id = looks_like_repo_id(entry.dataset) and not Path(entry.dataset).exists()
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Language modelling",
            # model-index wants a Hub dataset id as the type; local files are read with the
            # `datasets` "text" builder, which is the honest type for them.
            dataset_type=entry.dataset if hub_id else "text",
            dataset_name=entry.dataset if hub_id else scrub_paths(entry.dataset),
            dataset_split=entry.split,
            metric_type="perplexity",
            metric_name="Perplexity",
            metric_value=round(entry.perplexity, 4),
        )
    ]


def quality_sentence(entries: list[EvalEntry], this: EvalEntry) -> str | None:
    """A plain sentence comparing this model's perplexity with the original's (the eval JSON's
    baseline on the same data), or None when the JSON has no baseline."""
    base = next(
        (e for e in entries if e is not this and e.role == "baseline" and e.dataset == this.dataset), None
    )
    if base is None or base.perplexity <= 0:
        return None
    ratio = this.perplexity / base.perplexity
    measured = f"perplexity {this.perplexity:,.3f} against {base.perplexity:,.3f} for the original"
    if ratio >= 2:
        return (
            f"**Measured: not usable as it is.** {measured[0].upper()}{measured[1:]} ({ratio:,.1f}× higher); "
            "uptrain it (`gqa-uptrain`) before use."
        )
    if ratio > 1.1:
        return f"Measured: {measured} ({100 * (ratio - 1):+.0f}%)."
    return f"Measured: {measured}, within 10% of it."


def evaluation_section(entries: list[EvalEntry], this: EvalEntry) -> str:
    """Markdown table of the perplexities in the eval JSON, this model's row marked, and a sentence
    comparing it with the original's when the JSON has one."""
    lines = [
        "## Evaluation",
        "",
        "Measured with `gqa-eval` (perplexity: lower is better):",
        "",
        "| model | K/V heads | KV cache / token | dataset | perplexity | tokens scored |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        name = f"**{e.model}** (this model)" if e is this else e.model
        dataset = f"{e.dataset} ({e.split})" if e.split else e.dataset
        heads = str(e.num_kv_heads) if e.num_kv_heads is not None else "n/a"
        kv = _fmt_bytes(e.kv_bytes_per_token) if e.kv_bytes_per_token is not None else "n/a"
        tokens = f"{e.tokens_scored:,}" if e.tokens_scored is not None else "n/a"
        lines.append(f"| {name} | {heads} | {kv} | {dataset} | {e.perplexity:.3f} | {tokens} |")
    sentence = quality_sentence(entries, this)
    if sentence:
        lines += ["", sentence]
    return scrub_paths("\n".join(lines)) + "\n"


def _auto_class(config: dict[str, Any]) -> str:
    arch = " ".join(config.get("architectures") or [])
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return "AutoModelForCausalLM"
    if "ForConditionalGeneration" in arch and config.get("is_encoder_decoder"):
        return "AutoModelForSeq2SeqLM"
    if "ForMaskedLM" in arch:
        return "AutoModelForMaskedLM"
    return "AutoModel"


def usage_section(repo_id: str, config: dict[str, Any], command: str | None = None) -> str:
    """How to load the published model (with ``trust_remote_code`` when it ships its code)."""
    auto = _auto_class(config)
    remote = bool(config.get("auto_map"))
    kw = ", trust_remote_code=True" if remote else ""
    lines = [
        "## Usage",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{kw})',
        f'model = {auto}.from_pretrained("{repo_id}"{kw})',
        "```",
    ]
    if remote:
        lines += [
            "",
            "This checkpoint ships its own modelling code (transformers has no grouped-query attention "
            "for this family), hence `trust_remote_code=True`; read the `.py` files in the repository "
            "before running them. With `gqa-uptrain` installed, `import gqa_uptrain` registers the same "
            "classes and no remote code is needed.",
        ]
    if command:
        lines += ["", "Published with:", "", "```bash", command, "```"]
    return scrub_paths("\n".join(lines)) + "\n"


def validate_card(card: ModelCard | str) -> list[str]:
    """Check a card the way the Hub will read it; return warnings, raise on errors.

    Errors (:class:`CheckpointError`): front matter that ``ModelCard`` cannot parse, a
    ``library_name`` other than ``transformers``, no ``gqa`` tag, a ``base_model`` or dataset that
    is not a string, a ``model-index`` without a name or with a non-numeric value. Warnings: no
    ``base_model`` (the Hub cannot link the original), no record of the conversion in the body.
    """
    try:
        parsed = ModelCard(str(card))
    except ValueError as e:  # ModelCard raises ValueError for bad YAML and bad model-index
        raise CheckpointError(f"the model card's front matter is invalid: {str(e).splitlines()[0]}") from None
    data = parsed.data
    if data.library_name != "transformers":
        raise CheckpointError(f"the model card's library_name is {data.library_name!r}, not 'transformers'")
    if "gqa" not in (data.tags or []):
        raise CheckpointError("the model card has no 'gqa' tag")
    for key in ("base_model", "datasets"):
        value = getattr(data, key, None)
        items = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, str) and v for v in items):
            raise CheckpointError(
                f"the model card's {key} must be a string or a list of strings, got {value!r}"
            )
    for r in data.eval_results or []:
        if _number(r.metric_value) is None:
            raise CheckpointError(
                f"the model card's model-index has a non-numeric {r.metric_type}: {r.metric_value!r}"
            )
    warnings = []
    bases = [data.base_model] if isinstance(data.base_model, str) else list(data.base_model or [])
    if not bases:
        warnings.append("the card names no base_model; pass --base-model OWNER/NAME to link the original")
    for b in bases:
        if not looks_like_repo_id(b):
            raise CheckpointError(f"the model card's base_model {b!r} is not a Hub repo id (owner/name)")
    if not any(m.group("name") == "conversion" for m in _SECTION.finditer(parsed.text)):
        warnings.append("the card does not record the conversion (no gqa-uptrain conversion section)")
    return warnings
