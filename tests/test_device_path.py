"""The calibrated path on an explicit device (``gqa_uptrain.merging.device``): the same figures as the
call without one, host memory when the device budget is too small, the autocast decision for GPUs,
device names checked up front, and the step timing the dry-run plan uses."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_uptrain.conversion.pipeline import convert
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.merging import device as dev
from gqa_uptrain.merging.aligned import CalibratedMerge
from gqa_uptrain.merging.refine import RefineSpec


def _convert(folder, out, calib, **kw):
    method = CalibratedMerge("aligned", tokens=calib, refine=kw.pop("refine", None), progress=False, **kw)
    convert(folder, out, 2, method, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return model.state_dict(), method.reports


@pytest.mark.parametrize("steps", [0, 20])
def test_explicit_cpu_device_and_host_fallback_give_todays_figures(make_model, tmp_path, caplog, steps):
    """Calibration, the fits and refinement on ``device="cpu"`` (and with a budget too small for the
    activations, which then live in host memory) write bit for bit the weights of the call without a
    device, with the same per-module reports; the log says where the activations went."""
    folder, _ = make_model("llama", hidden=64, num_heads=8, num_kv_heads=8)
    calib = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    refine = RefineSpec(steps=steps) if steps else None
    base, base_reports = _convert(folder, tmp_path / "none", calib, refine=refine)
    with caplog.at_level(logging.INFO, logger="gqa_uptrain.merging.device"):
        on_cpu, cpu_reports = _convert(folder, tmp_path / "cpu", calib, refine=refine, device="cpu")
        assert "on cpu" in caplog.text
        caplog.clear()
        small, small_reports = _convert(
            folder, tmp_path / "small", calib, refine=refine, device="cpu", max_device_memory=1024
        )
        assert "in host memory" in caplog.text and "device budget 0.00 GB" in caplog.text
    for other in (on_cpu, small):
        assert base.keys() == other.keys()
        assert all(torch.equal(base[k], other[k]) for k in base)
    strip = lambda rs: [(r.module_name, r.error_before, r.error_after, r.steps, r.kept) for r in rs]  # noqa: E731
    assert strip(base_reports) == strip(cpu_reports) == strip(small_reports)
    if steps:
        assert all(r.kept and r.error_after < r.error_before for r in base_reports), base_reports


def test_convert_takes_device_options_and_refuses_bad_ones(make_model, tmp_path, python_docs):
    """``convert(device=, max_device_memory=)`` by name; a GPU that is not there, a bad device or size
    is a one-line error before anything is written."""
    from gqa_uptrain.conversion.pipeline import _merge_method

    folder, _ = make_model("llama", hidden=32, num_heads=4, num_kv_heads=4)
    text = python_docs / "tutorial" / "controlflow.rst.txt"
    method = _merge_method(
        "aligned", text, None, None, "contiguous", False, device="cpu", max_device_memory="1GB"
    )
    assert isinstance(method, CalibratedMerge)
    assert (method.device, method.max_device_memory) == ("cpu", 10**9)
    for kw, match in (
        ({"device": "tpu"}, "--device"),
        ({"device": "cpu", "max_device_memory": "lots"}, "--max-device-memory"),
    ):
        with pytest.raises(ConfigError, match=match):
            convert(folder, tmp_path / "bad", 2, "aligned", calibration=text, progress=False, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            convert(folder, tmp_path / "bad", 2, "aligned", calibration=text, device="cuda", progress=False)
    assert not (tmp_path / "bad").exists()


def test_resolve_device():
    assert dev.resolve_device("cpu") == torch.device("cpu")
    auto = dev.resolve_device("auto")
    assert auto == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert dev.resolve_device(None) == auto
    with pytest.raises(ConfigError, match="not a device"):
        dev.resolve_device("gpu!")
    if torch.cuda.is_available():
        assert dev.resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(ConfigError, match="visible"):
            dev.resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ConfigError, match="no CUDA GPU"):
                dev.resolve_device(name)
    assert dev.parse_memory("2GB") == 2 * 10**9 and dev.parse_memory(None) is None


def test_autocast_decision():
    """bf16 autocast: on a GPU with native bf16 at every width; on a CPU with native bf16 only from
    ``CPU_AUTOCAST_MIN_WIDTH``; never where bf16 is emulated or the spec turns it off."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    wide = dev.CPU_AUTOCAST_MIN_WIDTH
    assert dev.use_autocast(True, cuda, 64, native=True)
    assert dev.use_autocast(True, cuda, wide, native=True)
    assert not dev.use_autocast(True, cuda, wide, native=False)
    assert not dev.use_autocast(False, cuda, wide, native=True)
    assert not dev.use_autocast(True, cpu, 64, native=True)
    assert dev.use_autocast(True, cpu, wide, native=True)
    assert not dev.use_autocast(True, cpu, wide, native=False)
    # Asking about a GPU on a machine without one answers, it does not fail.
    assert dev.bf16_native(cuda) is (
        torch.cuda.is_available() and torch.cuda.get_device_capability(cuda)[0] >= 8
    )


def test_activation_placement():
    """Activations stay on the device when they fit next to the working memory; otherwise they are
    kept in host memory (pinned only where CUDA exists) and handed to the device one use at a time."""
    cpu = torch.device("cpu")
    assert dev.place_activations(cpu, 10**6, 10**6, None).on_device  # no budget: the device
    assert dev.place_activations(cpu, 10**6, 10**6, 2 * 10**6).on_device
    p = dev.place_activations(cpu, 10**6, 10**6, 2 * 10**6 - 1)
    assert not p.on_device and p.pin == torch.cuda.is_available() and p.home == cpu
    x = torch.randn(3, 4)
    kept = p.keep(x)
    assert torch.equal(p.use(kept), x) and p.use(kept).device == cpu


def test_refinement_step_timing_from_the_config_alone():
    """The dry-run plan's timing: a few refinement steps of one synthetic layer built from the config."""
    from gqa_uptrain.merging.timing import time_refinement_steps

    config = {
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 8,
        "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 1000, "max_position_embeddings": 128,
    }  # fmt: skip
    t = time_refinement_steps(config, 2, "cpu", 32, steps=2)
    assert t.seconds_per_step > 0 and t.layer_forward_seconds > 0 and t.steps == 2
    assert t.peak_device_bytes is None and t.peak_host_bytes > 0 and t.batch_tokens == 4 * 32
    assert t.bf16 is False  # 64 wide on a CPU
