"""Layer-by-layer calibration sees what the whole model sees: the moments ``collect_moments`` reports
for each attention module equal those of the model loaded whole by ``from_pretrained`` (an oracle
that shares none of calibration's loading), for every native family. Mixtral is the case where the
two loaders differ: transformers 5 renames its router and fuses its experts at load time."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import NATIVE_FAMILIES
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gqa_uptrain.architectures import FusedParam, get_architecture
from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.io.checkpoint import open_source
from gqa_uptrain.merging import calibration
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.calibration import collect_moments

# Four experts, two per token: the experts' order and the gate/up order inside gate_up_proj both
# change what layer 1 sees.
MIXTRAL_4X2 = {"num_local_experts": 4, "num_experts_per_tok": 2}


def _tokens(n: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (n, 32), generator=torch.Generator().manual_seed(0))


def _calibrated(folder, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, calibration.ModuleMoments]:
    src = open_source(folder)
    try:
        moments: dict[str, calibration.ModuleMoments] = {}
        collect_moments(
            src,
            tokens,
            lambda m: moments.__setitem__(m.module_name, m),
            batch_size=batch_size,
            progress=False,
        )
        return moments
    finally:
        src.close()


def _input_projection(mt) -> str:
    """Model path of the module's first Q-carrying projection (``q_proj``, ``qkv_proj``): its input
    is the attention module's input."""
    for suffix, names in mt.tensors.items():
        if "q" in mt.module.tensors[suffix].roles() and mt.module.tensor_kind(suffix) == "weight":
            return names[0].rsplit(".", 1)[0]
    raise AssertionError(f"{mt.name}: no Q projection")


@torch.no_grad()
def _oracle(folder, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``E[x̃ x̃ᵀ]`` of each converted attention module's input, from a full ``from_pretrained``
    forward with hooks on the Q projections."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    arch = get_architecture(model.config.to_dict())
    modules = arch.attention_modules((n for n, _ in model.named_parameters()), converted_only=True)
    xs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = [
        model.get_submodule(_input_projection(mt)).register_forward_pre_hook(
            lambda _m, args, key=name: xs[key].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, mt in modules.items()
    ]
    try:
        for batch in tokens.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in xs.items():
        x = torch.cat(parts).to(torch.float64)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        out[name] = x.T @ x / len(x)
    return out


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [(t, {}) for t in sorted(NATIVE_FAMILIES)] + [("mixtral", MIXTRAL_4X2)],
    ids=[*sorted(NATIVE_FAMILIES), "mixtral-4x2"],
)
def test_calibrated_moments_equal_a_full_forward(make_model, model_type, extra):
    """Every layer's moments, layer 1's included (which see layer 0's MLP, Mixtral's fused experts
    for one), are the whole model's."""
    folder, _ = make_model(model_type, **extra)
    tokens = _tokens()
    got = _calibrated(folder, tokens)
    want = _oracle(folder, tokens)
    assert sorted(got) == sorted(want) and len(want) == 2
    for name, mom in got.items():
        assert mom.num_tokens == tokens.numel()
        torch.testing.assert_close(mom.sigma, want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_mixtral_converts_with_calibration_not_the_weights_only_fallback(make_model, tmp_path):
    folder, _ = make_model("mixtral", groups=2, **MIXTRAL_4X2)
    method = CalibratedMerge("aligned", tokens=_tokens(4), progress=False)
    convert(folder, tmp_path / "out", 2, method, progress=False)
    assert method.fallback is None, method.fallback
    assert len(method.plans) == 2


def _fused_experts(model: torch.nn.Module) -> bool:
    """Whether this transformers fuses Mixtral's experts (5.x) or keeps the checkpoint's layout (4.x)."""
    return any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())


def test_the_oracle_sees_the_expert_layout(make_model, monkeypatch):
    """Sensitivity: with w1 and w3 swapped in Mixtral's recipe, layer 1's moments no longer match
    (so the equality above checks the fused layout, not just the attention path)."""
    folder, model = make_model("mixtral", **MIXTRAL_4X2)
    if not _fused_experts(model):
        pytest.skip("this transformers keeps Mixtral's experts unfused: no recipe is used")
    arch = get_architecture({"model_type": "mixtral"})
    swapped = tuple(
        replace(fp, sources=fp.sources[::-1]) if fp.param.endswith("gate_up_proj") else fp
        for fp in arch.fused_params
    )
    real = calibration.get_architecture

    def patched(config):
        found = real(config)
        return replace(found, fused_params=swapped) if found is arch else found

    monkeypatch.setattr(calibration, "get_architecture", patched)
    tokens = _tokens()
    got = _calibrated(folder, tokens)
    want = _oracle(folder, tokens)
    first, second = "model.layers.0.self_attn", "model.layers.1.self_attn"
    torch.testing.assert_close(got[first].sigma, want[first], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[second].sigma, want[second], rtol=1e-3, atol=1e-5)


def test_a_checkpoint_that_does_not_fit_the_recipe_falls_back(make_model, tmp_path):
    """An expert missing from the checkpoint: the fused tensor cannot take the model's shape, so
    calibration says so (and aligned falls back to the weights-only fit) instead of loading a
    wrong layout or failing."""
    folder, model = make_model("mixtral", **MIXTRAL_4X2)
    if not _fused_experts(model):
        pytest.skip("this transformers keeps Mixtral's experts unfused: no recipe is used")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for w in ("w1", "w2", "w3"):
        del tensors[f"model.layers.0.block_sparse_moe.experts.3.{w}.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(calibration.NotCalibratable, match="cannot be built"):
        _calibrated(folder, _tokens(4))
    method = CalibratedMerge("aligned", tokens=_tokens(4), progress=False)
    convert(folder, tmp_path / "out", 2, method, progress=False)
    assert method.fallback is not None and "cannot be built" in method.fallback


def test_fused_param_matches_by_the_end_of_the_name():
    fp = FusedParam("mlp.gate.weight", ("block_sparse_moe.gate.weight",))
    assert fp.parent("model.layers.3.mlp.gate.weight") == "model.layers.3."
    assert fp.parent("mlp.gate.weight") == ""
    assert fp.parent("model.layers.3.xmlp.gate.weight") is None
    assert fp.parent("model.layers.3.mlp.gate.bias") is None
