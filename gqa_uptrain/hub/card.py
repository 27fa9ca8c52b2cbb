"""Model cards (README.md with YAML front matter) for converted and uptrained checkpoints.

The card is built with ``huggingface_hub.ModelCard`` so the Hub parses it. Its body is a list of
named sections; each step (conversion, uptraining, evaluation, export) adds or replaces its own
section with :func:`update_card` and leaves the others alone.

What is here is generic: loading, updating and validating a card, the loading, evaluation and
usage sections. The conversion's own section (source, method credits, what is known of its
quality) is :mod:`gqa_uptrain.conversion.card`. This module is light (no torch, nothing of the
conversion), so uptraining and ``gqa-export`` use it without loading either.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import CheckpointError, ConfigError
from ..io.locate import looks_like_repo_id
from ..io.outputs import format_bytes

_SECTION = re.compile(
    r"<!-- gqa-uptrain:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /gqa-uptrain:(?P=name) -->\n?", re.S
)


def base_model_id(source: str, config: dict[str, Any] | None = None) -> str | None:
    """The Hub id of the original model, when it can be known from its name or its config."""
    if looks_like_repo_id(source) and not Path(source).exists():
        return source
    name = (config or {}).get("_name_or_path", "")
    return name if looks_like_repo_id(str(name)) and not Path(str(name)).exists() else None


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
                    "(or `gqa_uptrain.register_auto_classes()` first). Stock transformers has no grouped-query attention for this family.",
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


def wrap_section(name: str, body: str) -> str:
    """``body`` between the markers that let :func:`update_card` find and replace section ``name``."""
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
    block = wrap_section(section, markdown)
    if any(m.group("name") == section for m in _SECTION.finditer(text)):
        text = _SECTION.sub(lambda m: block if m.group("name") == section else m.group(0), text)
    else:
        text = text.rstrip() + "\n\n" + block
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")


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
        kv = format_bytes(e.kv_bytes_per_token) if e.kv_bytes_per_token is not None else "n/a"
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
            "before running them. With `gqa-uptrain` installed, `gqa_uptrain.register_auto_classes()` "
            "registers the same classes and no remote code is needed.",
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
