"""Conversion plans of real model shapes (Llama-2-70B, Llama-3-8B), from safetensors headers alone.

The checkpoints here are sparse files: a real safetensors header describing every tensor of the
real model, then a hole as long as the data would be. The reader accepts them (the data length
is right) and the planner never reads tensor data, so a 138 GB model is planned in a second and a
few kilobytes of disk. The expected shapes and sizes are written out from the model's published
config, independently of the converter's layout code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gqa_uptrain.conversion import convert, plan_conversion
from gqa_uptrain.errors import DiskFullError
from gqa_uptrain.io.checkpoint import SafetensorsReader
from gqa_uptrain.io.writer import planned_files

DTYPE_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}

LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def llama_tensors(cfg: dict, kv_heads: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint with ``kv_heads`` K/V heads, in Hugging Face's order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = kv_heads * h // cfg["num_attention_heads"]  # K/V heads x head_dim (128 here)
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_sparse_checkpoint(
    folder: Path, cfg: dict, dtype: torch.dtype, shard_bytes: int = 10 * 10**9
) -> Path:
    """A sharded safetensors checkpoint of ``cfg``'s shapes whose data is a hole (sparse files)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(cfg, cfg["num_key_value_heads"]):
        nbytes = numel(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            n = numel(shape) * itemsize
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # the data: a hole, no blocks on disk
    total = sum(numel(shape) * itemsize for shard in shards for _, shape in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def no_data_reads(monkeypatch):
    """Fail the test if anything reads tensor data (planning must use the headers alone)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr(SafetensorsReader, "read", refuse)
    monkeypatch.setattr(SafetensorsReader, "copy_raw", refuse)


def check_plan(plan, cfg: dict, g: int, dtype: torch.dtype) -> None:
    """Every planned tensor, the sizes and the KV-cache figures against the published shapes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = llama_tensors(cfg, g)
    assert [(t.name, t.shape) for t in plan.tensors] == want
    assert {t.dtype for t in plan.tensors} == {dtype}
    assert plan.num_heads == cfg["num_attention_heads"] and plan.head_dim == 128
    assert (plan.num_kv_heads_before, plan.num_kv_heads_after) == (cfg["num_key_value_heads"], g)
    assert plan.converted_modules == cfg["num_hidden_layers"]
    params_before = sum(numel(s) for _, s in llama_tensors(cfg, cfg["num_key_value_heads"]))
    params_after = sum(numel(s) for _, s in want)
    assert (plan.params_before, plan.params_after) == (params_before, params_after)
    assert plan.input_bytes == params_before * itemsize
    assert plan.tensor_bytes == params_after * itemsize
    # The files the writer will produce, headers and index included, add up to the plan's size.
    assert plan.shards == planned_files(plan.tensors, 5 * 10**9)
    assert plan.weights_bytes == sum(size for _, size in plan.shards)
    assert 0 < plan.weights_bytes - plan.tensor_bytes < 1 << 20  # headers and index: kilobytes
    assert plan.output_bytes > plan.weights_bytes
    # KV cache per token: K and V, every layer, every K/V head, head_dim 128, 2 bytes each.
    layers = cfg["num_hidden_layers"]
    assert plan.kv_bytes_per_token_before == 2 * layers * cfg["num_key_value_heads"] * 128 * itemsize
    assert plan.kv_bytes_per_token_after == 2 * layers * g * 128 * itemsize
    assert plan.kv_reduction == pytest.approx(1 - g / cfg["num_key_value_heads"])


@pytest.fixture(scope="module")
def llama2_70b(tmp_path_factory) -> Path:
    return write_sparse_checkpoint(
        tmp_path_factory.mktemp("sparse") / "llama2-70b", LLAMA2_70B, torch.float16
    )


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory) -> Path:
    return write_sparse_checkpoint(tmp_path_factory.mktemp("sparse") / "llama3-8b", LLAMA3_8B, torch.bfloat16)


def test_sparse_checkpoints_take_no_disk(llama2_70b):
    files = list(llama2_70b.glob("*.safetensors"))
    assert len(files) == 15  # as the published checkpoint
    assert sum(f.stat().st_size for f in files) > 137 * 10**9  # the real model's length...
    assert sum(f.stat().st_blocks * 512 for f in files) < 10 << 20  # ...in headers only


@pytest.mark.parametrize(
    ("g", "params_after", "kv_after"), [(2, 67_970_015_232, 81_920), (1, 67_802_243_072, 40_960)]
)
def test_llama2_70b_plan_from_headers(llama2_70b, no_data_reads, g, params_after, kv_after):
    plan = plan_conversion(llama2_70b, g)
    check_plan(plan, LLAMA2_70B, g, torch.float16)
    # Published figures: 68.98B parameters, 320 KiB of KV cache per token in fp16.
    assert plan.params_before == 68_976_648_192 and plan.params_after == params_after
    assert plan.kv_bytes_per_token_before == 327_680 and plan.kv_bytes_per_token_after == kv_after
    assert plan.kv_reduction == {2: 0.75, 1: 0.875}[g]
    assert plan.architecture == "Llama" and plan.dtype == "float16"
    assert len(plan.shards) == 30 and plan.shards[-1][0] == "model.safetensors.index.json"
    k = next(t for t in plan.tensors if t.name == "model.layers.79.self_attn.k_proj.weight")
    assert k.shape == (g * 128, 8192)


def test_llama3_8b_plan_from_headers(llama3_8b, no_data_reads):
    plan = plan_conversion(llama3_8b, 2)
    check_plan(plan, LLAMA3_8B, 2, torch.bfloat16)
    assert plan.params_before == 8_030_261_248 and plan.params_after == 7_828_934_656
    assert plan.kv_bytes_per_token_before == 131_072 and plan.kv_bytes_per_token_after == 32_768
    assert plan.dtype == "bfloat16"


def test_plan_dtype_and_shard_size(llama3_8b, no_data_reads):
    plan = plan_conversion(llama3_8b, 1, dtype="float32", max_shard_size="2GB")
    assert {t.dtype for t in plan.tensors} == {torch.float32}
    assert plan.tensor_bytes == plan.params_after * 4
    assert plan.kv_bytes_per_token_after == 2 * 32 * 1 * 128 * 4
    # Shards stay under the limit except one holding a single larger tensor (lm_head: 2.1 GB in fp32).
    largest = max(t.nbytes for t in plan.tensors)
    assert largest > 2 * 10**9
    assert all(
        size <= 2 * 10**9 + (1 << 20) or largest <= size < largest + (1 << 20) for _, size in plan.shards
    )


def test_plan_checks_output_and_free_space(llama3_8b, tmp_path, monkeypatch, no_data_reads):
    from gqa_uptrain.errors import OutputExistsError

    usage = shutil._ntuple_diskusage(1 << 40, (1 << 40) - (10 << 30), 10 << 30)  # 10 GiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(DiskFullError, match=r"needs 14\.6 GiB but .* has 10\.0 GiB free"):
        plan_conversion(llama3_8b, 2, output=tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        plan_conversion(llama3_8b, 2, output=tmp_path / "taken", dtype="float16")
    roomy = shutil._ntuple_diskusage(1 << 40, (1 << 40) - (20 << 30), 20 << 30)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: roomy)
    assert plan_conversion(llama3_8b, 1, output=tmp_path / "out").output_bytes < 20 << 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # a plan writes nothing


def test_planned_files_match_what_is_written(make_model, tmp_path):
    """The sizes the disk check relies on are exact: the written shards and index match them."""
    src, _ = make_model("llama", save_kwargs={"max_shard_size": "60KB"})
    plan = plan_conversion(src, 2, max_shard_size="100KB")
    convert(src, tmp_path / "out", 2, max_shard_size="100KB", progress=False)
    written = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir() if "safetensors" in p.name}
    assert len(plan.shards) > 2 and written == dict(plan.shards)
    support = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if "safetensors" not in p.name)
    assert support < plan.support_bytes


def test_cli_dry_run_prints_the_plan_and_writes_nothing(llama2_70b, tmp_path, monkeypatch, no_data_reads):
    from typer.testing import CliRunner

    from gqa_uptrain.cli.convert import app

    usage = shutil._ntuple_diskusage(1 << 42, 1 << 41, 1 << 41)  # 2 TiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    runner = CliRunner()
    res = runner.invoke(app, [str(llama2_70b), str(tmp_path / "out"), "-g", "8", "--dry-run"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "dry run: Llama: 8 → 8 K/V heads" in text
    res = runner.invoke(app, [str(llama2_70b), str(tmp_path / "out"), "-g", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "dry run: Llama: 8 → 1 K/V heads" in text
    assert "68,976,648,192" in text and "67,802,243,072" in text
    assert "320.0 KiB" in text and "40.0 KiB" in text and "87.5% smaller" in text
    assert "would write 723 tensors to 29 shards of up to" in text and "model.safetensors.index.json" in text
    assert "of 2.0 TiB free" in text and "nothing written" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    small = shutil._ntuple_diskusage(1 << 42, 1 << 41, 100 << 30)  # 100 GiB: not enough for 126 GiB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: small)
    res = runner.invoke(app, [str(llama2_70b), str(tmp_path / "out"), "-g", "1", "--dry-run"])
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "needs 126.3 GiB but" in res.output and "100.0 GiB free" in res.output

    help_ = runner.invoke(app, ["--help"])
    assert "--dry-run" in help_.output
