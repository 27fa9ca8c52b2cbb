"""Grouped-query variants of the families transformers has no GQA for: GPT-2, GPT-NeoX, OPT, T5, BERT.

* :mod:`.gqa_attention` holds the shared core (``GroupedQueryAttention`` and the grouped SDPA/eager
  kernels), usable on its own.
* ``modeling_<family>_gqa.py`` subclasses the stock transformers classes, adds ``num_key_value_heads`` to
  the config and swaps the attention modules; each file documents the parameter layout the converter
  writes.

The modelling files import only torch and transformers (and their sibling ``gqa_attention.py`` by
relative import), so the converter copies them into a converted checkpoint together with an ``auto_map``
and ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` loads it where only transformers is
installed. :func:`register_auto_classes` registers the same classes with the Auto classes, so no remote
code is needed where this package is installed. Nothing registers them on import: call
``gqa_uptrain.register_auto_classes()`` once before loading; our own entry points (``gqa-eval``,
``gqa-uptrain``, calibration, ``gqa-export``'s checks) do it themselves, the loading ones through
:mod:`gqa_uptrain.io.models` (see ``gqa_uptrain/__init__.py``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GQAFamily:
    """What the converter needs to write a checkpoint of one family's GQA variant.

    Plain data, so that describing a family imports no modelling code; ``register_auto_classes`` and
    the tests check it against the modelling module's own ``AUTO_MAP``.
    """

    stock_model_type: str  # config.json model_type of the stock MHA checkpoint, e.g. "gpt2"
    model_type: str  # model_type of the converted checkpoint, e.g. "gpt2_gqa"
    module: str  # modelling file stem, e.g. "modeling_gpt2_gqa"
    auto_classes: Mapping[
        str, str
    ]  # Auto class -> our class, e.g. AutoModelForCausalLM -> GPT2GQALMHeadModel
    prefix: str  # stock class-name prefix, e.g. "GPT2"; our classes are named prefix + "GQA" + rest

    def files(self) -> list[Path]:
        """Source files to copy next to the weights: the family's modelling file and the shared core."""
        return [_HERE / f"{self.module}.py", _HERE / "gqa_attention.py"]

    def load(self) -> ModuleType:
        """Import the family's modelling module."""
        return importlib.import_module(f"{__name__}.{self.module}")

    def auto_map(self) -> dict[str, str]:
        """The ``auto_map`` for config.json: Auto class name -> ``"<file stem>.<class>"``."""
        return {auto: f"{self.module}.{cls}" for auto, cls in self.auto_classes.items()}

    def architectures(self, stock: list[str]) -> list[str]:
        """Map the stock ``architectures`` of config.json to our classes.

        ``GPT2LMHeadModel`` -> ``GPT2GQALMHeadModel``. A stock head we have no variant of (e.g.
        ``GPT2DoubleHeadsModel``) maps to the family's main class (``auto_classes``' first model entry).
        """
        ours = {c for a, c in self.auto_classes.items() if a != "AutoConfig"}
        main = next(c for a, c in self.auto_classes.items() if a not in ("AutoConfig", "AutoModel"))
        out = []
        for name in stock:
            mapped = self.prefix + "GQA" + name[len(self.prefix) :] if name.startswith(self.prefix) else main
            out.append(name if name in ours else mapped if mapped in ours else main)
        return list(dict.fromkeys(out)) or [main]


def _auto(module_prefix: str, config: str, **models: str) -> dict[str, str]:
    return {"AutoConfig": config, **{f"AutoModel{k}": module_prefix + v for k, v in models.items()}}


FAMILIES: dict[str, GQAFamily] = {
    f.stock_model_type: f
    for f in (
        GQAFamily(
            "gpt2",
            "gpt2_gqa",
            "modeling_gpt2_gqa",
            _auto(
                "GPT2GQA",
                "GPT2GQAConfig",
                ForCausalLM="LMHeadModel",
                **{"": "Model"},
                ForSequenceClassification="ForSequenceClassification",
                ForTokenClassification="ForTokenClassification",
                ForQuestionAnswering="ForQuestionAnswering",
            ),
            "GPT2",
        ),
        GQAFamily(
            "gpt_neox",
            "gpt_neox_gqa",
            "modeling_gpt_neox_gqa",
            _auto(
                "GPTNeoXGQA",
                "GPTNeoXGQAConfig",
                ForCausalLM="ForCausalLM",
                **{"": "Model"},
                ForSequenceClassification="ForSequenceClassification",
                ForTokenClassification="ForTokenClassification",
                ForQuestionAnswering="ForQuestionAnswering",
            ),
            "GPTNeoX",
        ),
        GQAFamily(
            "opt",
            "opt_gqa",
            "modeling_opt_gqa",
            _auto(
                "OPTGQA",
                "OPTGQAConfig",
                ForCausalLM="ForCausalLM",
                **{"": "Model"},
                ForSequenceClassification="ForSequenceClassification",
                ForQuestionAnswering="ForQuestionAnswering",
            ),
            "OPT",
        ),
        GQAFamily(
            "t5",
            "t5_gqa",
            "modeling_t5_gqa",
            _auto("T5GQA", "T5GQAConfig", ForSeq2SeqLM="ForConditionalGeneration", **{"": "Model"}),
            "T5",
        ),
        GQAFamily(
            "bert",
            "bert_gqa",
            "modeling_bert_gqa",
            _auto(
                "BertGQA",
                "BertGQAConfig",
                **{"": "Model"},
                ForMaskedLM="ForMaskedLM",
                ForSequenceClassification="ForSequenceClassification",
                ForTokenClassification="ForTokenClassification",
                ForQuestionAnswering="ForQuestionAnswering",
            ),
            "Bert",
        ),
    )
}
"""The GQA families, keyed by the stock ``model_type``."""


def get_family(model_type: str) -> GQAFamily | None:
    """The family of a stock (``"gpt2"``) or already converted (``"gpt2_gqa"``) model type, else None."""
    for family in FAMILIES.values():
        if model_type in (family.stock_model_type, family.model_type):
            return family
    return None


_registered = False


def register_auto_classes() -> None:
    """Register every GQA config and model class with transformers' Auto classes (idempotent).

    After this, ``AutoConfig`` / ``AutoModel*`` load converted checkpoints of these families with no
    ``trust_remote_code``.
    """
    global _registered
    if _registered:
        return
    import transformers

    for family in FAMILIES.values():
        module = family.load()
        config_class = getattr(module, family.auto_classes["AutoConfig"])
        transformers.AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for auto_name, class_name in family.auto_classes.items():
            if auto_name != "AutoConfig":
                getattr(transformers, auto_name).register(
                    config_class, getattr(module, class_name), exist_ok=True
                )
    _registered = True
    logger.debug("registered GQA model classes for %s", ", ".join(f.model_type for f in FAMILIES.values()))


__all__ = ["FAMILIES", "GQAFamily", "get_family", "register_auto_classes"]
