"""Families with no GQA in transformers (GPT-2, GPT-NeoX, OPT, T5, BERT): the converted checkpoint
ships GQA modelling code of ours (``gqa_uptrain.modeling``) and loads with ``trust_remote_code``."""

from __future__ import annotations

from .base import Architecture

CUSTOM: tuple[Architecture, ...] = ()
