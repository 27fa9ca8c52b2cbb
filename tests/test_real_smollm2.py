"""The real SmolLM2-135M-Instruct checkpoint (GGUF, Llama, 9 query / 3 K/V heads) converted to MQA."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_uptrain import convert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "mqa"
    # float32: the exactness test compares against transformers' own float32 dequantization.
    result = convert(smollm2_gguf, out, 1, progress=False, dtype="float32")
    return out, result


@pytest.fixture(scope="module")
def heldout_ids(converted, python_docs):
    tok = AutoTokenizer.from_pretrained(converted[0])
    text = (python_docs / "tutorial" / "controlflow.rst.txt").read_text()
    return tok(text, return_tensors="pt").input_ids[:, :256]


def test_gguf_converts_to_mqa_and_loads(converted, heldout_ids, smollm2_gguf):
    out, result = converted
    assert result.architecture == "Llama"
    assert (result.num_heads, result.num_kv_heads_before, result.num_kv_heads_after) == (9, 3, 1)
    assert result.kv_reduction == pytest.approx(2 / 3)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 576)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is Python?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 8
    with torch.no_grad():
        ppl = math.exp(model(heldout_ids, labels=heldout_ids).loss.item())
    print(f"SmolLM2-135M MQA (mean pooling, no uptraining) perplexity on held-out Python docs: {ppl:.1f}")
    assert math.isfinite(ppl)


def test_gguf_conversion_is_exact_against_transformers_gguf_loader(converted, heldout_ids, smollm2_gguf):
    """Our tensor-by-tensor GGUF route equals transformers' own GGUF loading followed by mean
    pooling in place (the exact oracle), and the original model's perplexity is sane."""
    orig = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    conv = AutoModelForCausalLM.from_pretrained(converted[0]).eval()
    ids = heldout_ids[:, :64]
    with torch.no_grad():
        ppl = math.exp(orig(heldout_ids, labels=heldout_ids).loss.item())
        assert ppl < 50, ppl
        for layer in orig.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(3, 64, -1)
                proj.weight.copy_(w.mean(0, keepdim=True).expand_as(w).reshape(proj.weight.shape))
        torch.testing.assert_close(conv(ids).logits, orig(ids).logits, rtol=1e-4, atol=1e-4)


def test_gguf_name_map_is_the_same_with_cached_tables(smollm2_gguf):
    """The GGUF reader builds llama.cpp's name table once per (architecture, layers) while mapping
    names (``_cached_tensor_name_maps``): the map equals transformers' uncached one, and ``gguf``'s
    function is restored afterwards."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from gqa_uptrain.io.checkpoint import open_source

    original = gguf.get_tensor_name_map
    src = open_source(str(smollm2_gguf))
    assert gguf.get_tensor_name_map is original
    reader = src.reader
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**src.config))
    assert get_gguf_hf_weights_map(skeleton, reader._processor) == reader._names
    assert len(reader._names) >= 272
