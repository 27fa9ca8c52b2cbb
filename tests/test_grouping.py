"""Similarity grouping: the partition search, and permuting whole heads leaves the model unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_uptrain.aligned import CalibratedMerge
from gqa_uptrain.conversion import convert
from gqa_uptrain.grouping import best_partition, kv_permutation, query_permutation


def _logits(folder, x):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("n", [8, 16])  # exhaustive search, and greedy + swaps
def test_best_partition_finds_planted_groups(n):
    size = 4
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(n)) % (n // size)

    def cost(group):  # zero for a planted group, positive for any mixed one
        return float(len({int(labels[h]) for h in group}) - 1)

    groups = best_partition(n, size, cost)
    assert sorted(h for g in groups for h in g) == list(range(n))
    assert all(cost(g) == 0 for g in groups)


def test_query_permutation_moves_query_heads_with_their_kv_head():
    kv = kv_permutation([(2, 0), (1, 3)])
    assert kv.tolist() == [2, 0, 1, 3]
    assert query_permutation(kv, 8).tolist() == [4, 5, 0, 1, 2, 3, 6, 7]


class _RandomPermutation(CalibratedMerge):
    """Mean pooling at G = Hkv (a copy) after a random permutation of the heads in every module."""

    def prepare(self, src, num_kv_heads):
        super().prepare(src, num_kv_heads)
        gen = torch.Generator().manual_seed(0)
        for plan in self.plans.values():
            hkv = int(src.config.get("num_key_value_heads") or src.config["num_attention_heads"])
            while plan.kv_perm is None or torch.equal(plan.kv_perm, torch.arange(hkv)):
                plan.kv_perm = torch.randperm(hkv, generator=gen)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {}),  # GQA source: query heads move with their K/V head
        ("qwen2", {}),  # biases
        ("olmo2", {}),  # whole-projection q/k norms
        ("stablelm", {"qk_layernorm": True}),  # one norm module per head
        ("phi3", {}),  # fused qkv_proj
    ],
)
def test_permuting_heads_leaves_logits_unchanged(make_model, tmp_path, model_type, extra):
    folder, model = make_model(model_type, num_heads=8, num_kv_heads=4, **extra)
    x = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    method = _RandomPermutation("mean", grouping="similarity", tokens=torch.randint(3, 128, (2, 16)), progress=False)
    convert(folder, tmp_path / "out", 4, method, progress=False)
    assert all(p.kv_perm is not None for p in method.plans.values())
    # the tensors did change (heads moved) ...
    from safetensors.torch import load_file

    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # ... the function did not
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(_logits(tmp_path / "out", x), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_similarity_grouping_finds_interleaved_twins(make_model, tmp_path):
    """Heads 0=2 and 1=3: contiguous groups mix different heads, similarity groups pair the twins,
    so similarity + mean is lossless and contiguous + mean is not."""
    folder, model = make_model("llama", num_heads=4, num_kv_heads=4)
    d = model.config.hidden_size // 4
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.view(4, d, -1)
            w[2], w[3] = w[0], w[1]
    model.save_pretrained(folder)
    x = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    for name, grouping in itertools.product(["mean", "aligned"], ["contiguous", "similarity"]):
        method = CalibratedMerge(name, grouping=grouping, tokens=calib, progress=False)
        out = tmp_path / f"{name}-{grouping}"
        result = convert(folder, out, 2, method, progress=False)
        err = (_logits(out, x) - ref).abs().max().item()
        if grouping == "similarity":
            assert err < 1e-3, (name, err)
            assert any("permuted into similarity groups in 2 of 2" in n for n in result.extra["card_notes"])
        elif name == "mean":
            assert err > 1e-2
