"""Uptraining at GPU speed and for one-GPU users, checked on CPU: the chunked loss, no per-step host
sync, torch.compile, LoRA and QLoRA (gqa_uptrain.training.losses / speed / lora)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _uptrain_fixtures import build_world, tiny_recipe
from accelerate import Accelerator
from safetensors.torch import load_file

from gqa_uptrain.errors import ConfigError, GQAError
from gqa_uptrain.training import loop
from gqa_uptrain.training.config import config_from_dict
from gqa_uptrain.training.loop import uptrain
from gqa_uptrain.training.losses import OutputHead, causal_lm_loss, chunked_lm_loss, kl_to_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("speed"))


def run(world: Path, out: Path, **sections) -> loop.UptrainResult:
    return uptrain(config_from_dict(tiny_recipe(world, out, **sections)))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# The chunked loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("teacher", [False, True])
def test_chunked_loss_equals_plain_loss_and_gradient(bias, teacher):
    """Values and gradients (hidden states, weight, bias) of CE + w·KL, chunks that do not divide
    the positions, ignored targets included; float64 inputs, so only float32 softmax rounding differs."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 17, 16, 50
    h = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    t_logits = torch.randn(B, T, V, dtype=torch.float64, generator=g) if teacher else None
    ce, kl = chunked_lm_loss(h, w, b, ids, chunk_tokens=5, teacher_logits=t_logits, temperature=2.0)
    total = ce + (0.7 * kl if teacher else 0.0)
    inputs = [h, w] + ([b] if bias else [])
    got = torch.autograd.grad(total, inputs)

    logits = h @ w.T + (b if bias else 0.0)  # [B, T, V]
    ce_ref = causal_lm_loss(logits, ids)
    kl_ref = kl_to_teacher(logits, t_logits, 2.0) if teacher else None
    want = torch.autograd.grad(ce_ref + (0.7 * kl_ref if teacher else 0.0), inputs)
    torch.testing.assert_close(ce.double(), ce_ref.double(), rtol=1e-6, atol=1e-6)
    if teacher:
        torch.testing.assert_close(kl.double(), kl_ref.double(), rtol=1e-6, atol=1e-6)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_output_head_refuses_a_soft_capping_model():
    """Gemma 2 soft-caps its logits after the projection: the chunked loss would be wrong, so the
    head is refused and the model's own forward is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    head = OutputHead.attach(llama, 16)
    assert head is not None and head.weight is llama.lm_head.weight
    assert llama(input_ids=torch.arange(5)[None]).logits.shape[-1] == 32  # hidden states now
    head.detach()
    assert llama(input_ids=torch.arange(5)[None]).logits.shape[-1] == 64

    cfg = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)  # fmt: skip
    gemma = AutoModelForCausalLM.from_config(cfg)
    assert OutputHead.attach(gemma, 16) is None
    assert gemma(input_ids=torch.arange(5)[None]).logits.shape[-1] == 64


def test_chunked_and_plain_loss_train_the_same(world, tmp_path):
    """Same loss curve and weights to float32 rounding, with distillation (the chunked KL) on."""
    common = {"budget": {"steps": 6}, "checkpoint": {"every": 0},
              "distill": {"teacher": str(world / "teacher"), "weight": 0.5}}  # fmt: skip
    plain = run(world, tmp_path / "plain", speed={"loss_chunk_tokens": 0}, **common)
    chunked = run(world, tmp_path / "chunked", speed={"loss_chunk_tokens": 48}, **common)
    a, b = plain.extra["train_loss"], chunked.extra["train_loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) < 1e-5
    assert chunked.eval_after["loss"] == pytest.approx(plain.eval_after["loss"], abs=1e-5)
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "chunked")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------------
# No host sync per step: the non-finite check stays exact
# --------------------------------------------------------------------------------------------------


def test_nan_between_sync_points_leaves_the_weights_of_the_last_finite_step(world, tmp_path, monkeypatch):
    """The loss is read back only every 4 steps; a NaN at step 6 is reported (naming step 6) at step
    8, and the weights are exactly those after step 5: the fused AdamW skipped steps 6-8 on the device.
    The same run reading back every step stops at step 6 with the same weights."""
    runs = {}
    real_setup = loop.setup

    def keep_run(*a, **k):
        r, s = real_setup(*a, **k)
        runs[len(runs)] = r
        return r, s

    real = loop.chunked_lm_loss
    calls = {"n": 0}

    def nan_at_step_6(*a, **k):
        ce, kl = real(*a, **k)
        calls["n"] += 1
        return (ce * float("nan") if calls["n"] % 100 == 6 else ce), kl

    monkeypatch.setattr(loop, "setup", keep_run)
    monkeypatch.setattr(loop, "chunked_lm_loss", nan_at_step_6)
    synced = {}
    for i, log_every in enumerate((1, 4)):
        calls["n"] = 0
        with pytest.raises(GQAError, match=r"loss became nan at step 6; stopped before updating the weights"):
            run(world, tmp_path / f"run{i}", output={"log_every": log_every}, checkpoint={"every": 0})
        synced[log_every] = {k: v.detach().clone() for k, v in runs[i].model.state_dict().items()}
    for k, v in synced[1].items():
        assert torch.equal(v, synced[4][k]), k


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_matches_eager(world, tmp_path):
    """Same loss curve to 1e-4 (compiled kernels fuse and reorder float32 sums) and same held-out loss."""
    common = {"budget": {"steps": 4}, "checkpoint": {"every": 0}, "eval": {"at_start": False}}
    eager = run(world, tmp_path / "eager", speed={"compile": False}, **common)
    compiled = run(world, tmp_path / "compiled", speed={"compile": True}, **common)
    for (s1, x), (s2, y) in zip(eager.extra["train_loss"], compiled.extra["train_loss"], strict=True):
        assert s1 == s2 and abs(x - y) < 1e-4, (s1, x, y)
    assert compiled.eval_after["loss"] == pytest.approx(eager.eval_after["loss"], abs=1e-4)


# --------------------------------------------------------------------------------------------------
# LoRA and QLoRA
# --------------------------------------------------------------------------------------------------

LORA = {"lora": {"mode": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}, "optim": {"lr": 1e-2}}


def test_lora_trains_only_adapters_and_merges_into_a_stock_checkpoint(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = run(world, out, checkpoint={"every": 4, "keep_last": 1}, **LORA)
    # Checkpoints hold the adapters only, not the frozen base.
    ckpt = out / "checkpoints" / "step_00000012"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    n_adapters = sum(v.numel() for v in load_file(str(ckpt / "adapter_model.safetensors")).values())
    # r=4 per layer: q, o: 4x64 + 64x4; k, v (2 K/V heads of 16): 4x64 + 32x4; two layers.
    assert r.trainable_parameters == n_adapters == 2 * (2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4))
    # model/: plain safetensors, no adapter files; the targeted (attention) weights changed, nothing else.
    before = load_file(str(world / "student" / "model.safetensors"))
    after = weights(out)
    assert after.keys() == before.keys()
    assert not (out / "model" / "adapter_config.json").exists()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "self_attn" in k and k.endswith("proj.weight")}
    # The merged checkpoint computes what the base + adapters compute.
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world / "student"), str(out / "adapters")
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert r.eval_after["loss"] < r.eval_before["loss"]
    # Stock transformers loads it with peft unimportable.
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})\n"
        "print(type(m).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LlamaForCausalLM" in done.stdout


def test_lora_resume_is_exact(world, tmp_path, monkeypatch):
    """A crash in step 7 (last checkpoint: step 4), then --resume: the same adapters, bit for bit,
    as the uninterrupted run (with adapter dropout on, so the RNG state is restored too)."""
    sections = {**LORA, "lora": {**LORA["lora"], "dropout": 0.1}, "checkpoint": {"every": 4}}
    run(world, tmp_path / "ref", **sections)
    out = tmp_path / "run"
    real_clip = Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("node lost")
        return real_clip(self, *a, **k)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_then_crash)
    with pytest.raises(RuntimeError, match="node lost"):
        run(world, out, **sections)
    monkeypatch.undo()
    run(world, out, output={"resume": True}, **sections)
    a = load_file(str(tmp_path / "ref" / "adapters" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    wa, wb = weights(tmp_path / "ref"), weights(out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_lora_targets_come_from_the_family_data(world):
    from transformers import AutoModelForCausalLM

    from gqa_uptrain.training.lora import lora_target_modules

    m = AutoModelForCausalLM.from_pretrained(world / "student")
    names = lambda t: {n.split("layers.0.")[-1] for n in lora_target_modules(m, t) if "layers.0." in n}  # noqa: E731
    assert names(["attention"]) == {f"self_attn.{p}_proj" for p in "qkvo"}
    assert names(["kv"]) == {"self_attn.k_proj", "self_attn.v_proj"}
    assert names(["mlp"]) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert names(["o_proj"]) == {"self_attn.o_proj"}
    with pytest.raises(ConfigError, match="lora.targets: 'nope' matches no linear layer"):
        lora_target_modules(m, ["nope"])


def test_lora_recipe_errors_are_one_line(world, tmp_path):
    with pytest.raises(ConfigError, match="lora.rank: must be positive"):
        config_from_dict(tiny_recipe(world, tmp_path, lora={"mode": "lora", "rank": 0}))
    with pytest.raises(ConfigError, match="lora.mode=lora and freeze.mode=kv"):
        config_from_dict(tiny_recipe(world, tmp_path, lora={"mode": "lora"}, freeze={"mode": "kv"}))
    with pytest.raises(ConfigError, match="speed.loss_chunk_tokens: must be >= 0"):
        config_from_dict(tiny_recipe(world, tmp_path, speed={"loss_chunk_tokens": -1}))


def test_qlora_without_bitsandbytes_says_how_to_get_it(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"qlora needs bitsandbytes.*pip install 'gqa-uptrain\[qlora\]'"):
        run(world, tmp_path / "run", lora={"mode": "qlora"})


@pytest.mark.slow
def test_qlora_runs_on_cpu_and_merges_into_the_original_weights(world, tmp_path):
    """bitsandbytes (>= 0.48) runs 4-bit layers on the CPU: the base's linear layers are NF4, the
    adapters train, and model/ is the checkpoint's own weights plus the adapters' update."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = run(world, out, budget={"steps": 6}, checkpoint={"every": 0},
            lora={"mode": "qlora", "rank": 4, "alpha": 8, "dropout": 0.0}, optim={"lr": 1e-2})  # fmt: skip
    assert r.eval_after["loss"] < r.eval_before["loss"]
    before = load_file(str(world / "student" / "model.safetensors"))
    after = weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "self_attn" in k and k.endswith("proj.weight")}
    # The merge is into the float weights: merged = original + the adapters' delta, exactly as peft
    # merges them into an unquantized base.
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world / "student"), str(out / "adapters")
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-4
        )
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["r"] == 4
    assert bnb.__version__


def test_qlora_gradients_survive_an_evaluation(world):
    """A run evaluates before its first step. bitsandbytes repacks a 4-bit layer for an inference-only
    CPU kernel (no backward) the first time it runs in eval mode without gradients; the base must
    keep the differentiable kernel, so every adapter's gradient after an evaluation is the gradient
    of a model that never evaluated, and torch reports no layer without a backward."""
    import warnings

    from transformers import AutoModelForCausalLM

    from gqa_uptrain.training.config import LoraConfig
    from gqa_uptrain.training.lora import apply_lora

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))

    def adapter_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(world / "student")
        cfg = LoraConfig(mode="qlora", rank=4, alpha=8, dropout=0.0)
        model, _ = apply_lora(model, cfg, torch.device("cpu"), torch.float32, str(world / "student"))
        for name, p in model.named_parameters():
            # B starts at zero: give it a value, so that A has a gradient too.
            if p.requires_grad and "lora_B" in name:
                p.data.normal_(0, 0.02)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(ids)
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(ids, labels=ids).loss.backward()
        assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = adapter_grads(False), adapter_grads(True)
    assert fresh.keys() == after_eval.keys() and len(fresh) > 0
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-5, atol=1e-7, msg=name)


def test_overwrite_clears_a_lora_runs_adapters(world, tmp_path):
    """A folder holding only a LoRA run's adapters/ is a previous run; --overwrite removes them, so a
    full-parameter run started over it leaves no stale adapters beside its model/."""
    from gqa_uptrain.errors import OutputExistsError
    from gqa_uptrain.training.checkpointing import prepare_output

    out = tmp_path / "run"
    (out / "adapters").mkdir(parents=True)
    (out / "adapters" / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(config_from_dict(tiny_recipe(world, out)), out)
    prepare_output(config_from_dict(tiny_recipe(world, out, output={"overwrite": True})), out)
    assert not (out / "adapters").exists()
