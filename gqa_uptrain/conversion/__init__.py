"""Conversion stage: plan every output tensor from the source's headers, stream and merge the K/V
heads layer by layer, write the sharded checkpoint with its support files and model card.
"""

from __future__ import annotations

from .pipeline import ConversionResult, convert
from .plan import ConversionPlan, plan_conversion

__all__ = ["ConversionPlan", "ConversionResult", "convert", "plan_conversion"]
