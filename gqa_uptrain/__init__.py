"""gqa-uptrain: turn multi-head-attention checkpoints into grouped-query attention and uptrain them.

Importing the package registers the GQA modelling classes of the families transformers has no
GQA for (GPT-2, GPT-NeoX, OPT, T5, BERT) with the Auto classes, so converted checkpoints of
those families load without ``trust_remote_code`` where the package is installed.
"""

from __future__ import annotations

from .conversion import ConversionResult, convert
from .errors import CheckpointError, ConfigError, GQAError, OutputExistsError
from .modeling import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionResult",
    "GQAError",
    "OutputExistsError",
    "convert",
]
