"""gqa-eval on tiny models: KV-cache sizes vs the allocated cache, perplexity, speed, outputs, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gqa_uptrain.cli.evaluate import app
from gqa_uptrain.data import DataConfig
from gqa_uptrain.errors import CheckpointError, ConfigError, GQAError
from gqa_uptrain.evaluation import (
    EvalOptions,
    allocated_cache_bytes,
    evaluate,
    kv_layout,
    measure_cache,
    measure_speed,
    perplexity,
    wrap_model,
)

runner = CliRunner()

FALLBACK_TEXT = (
    "The Python Tutorial. Python is an easy to learn, powerful programming language. It has efficient "
    "high-level data structures and a simple but effective approach to object-oriented programming. "
)


def _real_text(python_docs_dir: Path | None, chars: int) -> str:
    """A slice of real English text (python3.11 docs), or a built-in paragraph without them."""
    if python_docs_dir is not None:
        f = python_docs_dir / "tutorial" / "appetite.rst.txt"
        if f.is_file():
            return f.read_text(encoding="utf-8")[:chars]
    return (FALLBACK_TEXT * (chars // len(FALLBACK_TEXT) + 1))[:chars]


@pytest.fixture(scope="module")
def docs_dir() -> Path | None:
    p = Path("/usr/share/doc/python3.11/html/_sources")
    return p if p.is_dir() else None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs_dir):
    """A 300-token byte-level BPE trained offline on real text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_real_text(docs_dir, 20000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return fast


def tiny_llama(num_kv_heads: int, vocab: int = 300, max_pos: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_pos,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# KV cache: computed from the config == allocated by generation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kv_heads", "attention"), [(4, "MHA"), (2, "GQA"), (1, "MQA")])
def test_kv_cache_bytes_match_allocated_cache(kv_heads, attention):
    model = tiny_llama(kv_heads)
    layout = kv_layout(model.config, torch.float32)
    assert layout.attention == attention
    # 2 (K, V) x 2 layers x kv_heads x head_dim 16 x 4 bytes, written out independently of the code.
    assert layout.bytes_per_token == 2 * 2 * kv_heads * 16 * 4
    for context, batch in [(7, 1), (33, 3)]:
        check = measure_cache(model, layout, context, batch, generated_tokens=5)
        assert check.computed_bytes == batch * context * layout.bytes_per_token
        # generate() caches the prompt and all generated tokens but the last one.
        assert check.allocated_bytes == batch * (context + 4) * layout.bytes_per_token
        assert check.match


def test_kv_cache_of_a_forward_pass_and_fewer_heads_save_proportionally():
    ids = torch.randint(0, 300, (2, 10))
    sizes = {}
    for k in (4, 2, 1):
        out = tiny_llama(k)(ids, use_cache=True)
        sizes[k] = allocated_cache_bytes(out.past_key_values)
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def test_kv_cache_encoder_decoder_counts_self_and_cross_attention():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(cfg).eval()
    layout = kv_layout(model.config, torch.float32)
    assert layout.cross_attention and layout.num_kv_heads == 4
    assert layout.bytes_per_token == 2 * (2 * 2 * 4 * 8 * 4)  # self + cross
    check = measure_cache(model, layout, context=9, batch=2, generated_tokens=3)
    assert check.match, check


def test_kv_layout_of_configs_without_num_key_value_heads():
    from transformers import FalconConfig, GPT2Config

    gpt2 = kv_layout(GPT2Config(n_embd=64, n_layer=3, n_head=8), torch.float16)
    assert (gpt2.num_layers, gpt2.num_kv_heads, gpt2.head_dim, gpt2.bytes_per_element) == (3, 8, 8, 2)
    falcon_mqa = kv_layout(
        FalconConfig(hidden_size=64, num_attention_heads=4, multi_query=True), torch.float32
    )
    assert falcon_mqa.attention == "MQA"


def _kv_configs():
    from transformers import GPT2Config, MistralConfig, T5Config

    return {
        "llama": tiny_llama(2).config,
        "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=8),
        "t5": T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4),
        "mistral": MistralConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
        ),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "mistral"])
def test_kv_bytes_of_known_families_are_the_converters_figure(family):
    """One calculator: for a family the converter describes, gqa-eval's bytes per token is the figure
    of ``Architecture.kv_cache_bytes_per_token`` (what gqa-convert reports), and agrees with the layout."""
    from gqa_uptrain.architectures import get_architecture

    config = _kv_configs()[family]
    raw = config.to_dict()
    layout = kv_layout(config, torch.bfloat16)
    assert layout.source == "architectures"
    assert layout.bytes_per_token == get_architecture(raw).kv_cache_bytes_per_token(raw, None, 2)
    per_cache = 2 * layout.num_kv_heads * layout.head_dim * 2  # K and V, bf16, one layer, one token
    assert layout.bytes_per_token == per_cache * layout.num_layers * (2 if layout.cross_attention else 1)


def test_expected_cache_bytes_follow_the_architectures_figure(monkeypatch):
    """The expected bytes of a known family are derived from the architectures' figure, not recomputed:
    change that figure and the expectation follows (the layout only spreads it over layers)."""
    from gqa_uptrain.architectures import Architecture

    config = _kv_configs()["mistral"]  # sliding window 8: the cap still applies per layer
    plain = kv_layout(config, torch.float32)
    real = Architecture.kv_cache_bytes_per_token
    monkeypatch.setattr(Architecture, "kv_cache_bytes_per_token", lambda *a: 3 * real(*a))
    tripled = kv_layout(config, torch.float32)
    assert tripled.bytes_per_token == 3 * plain.bytes_per_token
    for context in (4, 7, 50):
        assert tripled.cache_bytes(context, batch=2) == 3 * plain.cache_bytes(context, batch=2)
    assert plain.cache_bytes(50) == plain.cache_bytes(7)  # at most sliding_window - 1 tokens kept


def test_kv_bytes_of_other_families_come_from_the_config_layout():
    from transformers import FalconConfig

    falcon = kv_layout(
        FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True),
        torch.float32,
    )
    assert falcon.source == "config" and falcon.bytes_per_token == 2 * 2 * 1 * 16 * 4


def test_kv_cache_mismatch_is_reported_not_hidden():
    # transformers' Falcon with new_decoder_architecture expands its K/V heads to every query head
    # before caching: the config says 2 K/V heads, the cache holds 4. The check must say so.
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(
        FalconConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        )
    ).eval()
    check = measure_cache(model, kv_layout(model.config, torch.float32), context=6, batch=1)
    if check.match:
        pytest.skip("this transformers version caches Falcon's K/V heads unexpanded")
    assert check.allocated_bytes == 2 * check.expected_bytes


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


def test_strided_perplexity_matches_token_by_token_reference():
    model = tiny_llama(2)
    ids = torch.randint(0, 300, (50,))
    L = 12
    result = perplexity(model, ids, max_length=L, stride=1, batch_size=4, progress=False)
    assert result.tokens_scored == len(ids) - 1
    # Reference: with stride 1 every token t sees the (up to) L-1 tokens before it.
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            window = ids[max(0, t - L + 1) : t + 1]
            logits = model(window[None]).logits[0, -2]
            nll.append(F.cross_entropy(logits, window[-1]).item())
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    # One window over the whole stream == the plain full-sequence loss.
    whole = perplexity(model, ids, max_length=64, progress=False)
    with torch.no_grad():
        full = model(ids[None], labels=ids[None]).loss.item()
    assert whole.perplexity == pytest.approx(math.exp(full), rel=1e-5)
    with pytest.raises(ConfigError, match="--stride"):
        perplexity(model, ids, max_length=L, stride=L, progress=False)
    for stride in (5, 11):
        assert (
            perplexity(model, ids, max_length=L, stride=stride, progress=False).tokens_scored == len(ids) - 1
        )


def _train_to_repeat(model, ids: torch.Tensor, steps: int = 250, block: int = 64) -> None:
    """Teach ``model`` to continue the token stream ``ids`` (random windows of it, AdamW)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # One thread: tiny matmuls gain nothing from two, and on a busy CI machine two spinning threads
    # make these few hundred steps many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - block, (16,))
            x = torch.stack([ids[s : s + block] for s in starts])  # (16, block)
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, tokenizer, docs_dir):
    """A tiny Llama trained to repeat a real paragraph, saved with its tokenizer; and the text file."""
    root = tmp_path_factory.mktemp("memorised")
    text = _real_text(docs_dir, 300) * 6
    (root / "data").mkdir()
    (root / "data" / "repeat.txt").write_text(text, encoding="utf-8")
    # Tokenized exactly as gqa-eval (and uptraining) tokenize a document: no specials, EOS after.
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    model = tiny_llama(4, vocab=len(tokenizer))
    untrained_ppl = perplexity(model, ids, max_length=64, progress=False).perplexity
    _train_to_repeat(model, ids)
    return _save(model, tokenizer, root / "model"), root / "data" / "repeat.txt", untrained_ppl


def test_perplexity_of_memorised_text_is_near_one(trained_model_dir, tmp_path):
    model_dir, text_file, untrained_ppl = trained_model_dir
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [str(model_dir), "--data", str(text_file), "--max-length", "64", "--stride", "32",
         "--skip-speed", "--context", "16", "--json", str(out), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    ppl = report["models"][0]["perplexity"]
    assert untrained_ppl > 50  # the model did not start out knowing the text
    assert ppl["perplexity"] < 1.3, ppl
    assert ppl["max_length"] == 64 and ppl["stride"] == 32
    assert report["models"][0]["kv_cache"]["all_match"]


# --------------------------------------------------------------------------------------------------
# Side by side, JSON and plots
# --------------------------------------------------------------------------------------------------


def test_cli_baseline_json_and_plots(tmp_path, tokenizer, trained_model_dir):
    _, text_file, _ = trained_model_dir
    mha = _save(tiny_llama(4, vocab=len(tokenizer)), tokenizer, tmp_path / "mha")
    gqa = _save(tiny_llama(1, vocab=len(tokenizer), seed=1), tokenizer, tmp_path / "mqa")
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    args = [str(gqa), "--baseline", str(mha), "--data", str(text_file), "--max-length", "32",
            "--context", "8,24", "--batch-size", "1,2", "--new-tokens", "4", "--repeats", "2",
            "--json", str(out), "--plot", str(plots)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    model, base = report["models"]
    assert (model["role"], base["role"]) == ("model", "baseline")
    assert model["kv_cache"]["attention"] == "MQA" and base["kv_cache"]["attention"] == "MHA"
    assert report["relative_to_baseline"]["kv_bytes_per_token"] == pytest.approx(0.25)
    assert model["kv_cache"]["all_match"] and base["kv_cache"]["all_match"]
    assert {(s["context"], s["batch"]) for s in model["speed"]} == {(8, 1), (8, 2), (24, 1), (24, 2)}
    for s in model["speed"]:
        assert s["decode_tokens_per_s"] > 0 and s["time_to_first_token_s"] > 0 and s["repeats"] == 2
    assert model["perplexity"]["perplexity"] > 1 and base["perplexity"]["perplexity"] > 1
    for name in ("perplexity_vs_kv_cache.png", "tokens_per_s_vs_context.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Outputs are never overwritten without --overwrite.
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_speed_and_peak_memory_of_generation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    r = measure_speed(model, context=512, batch=2, new_tokens=4, warmup=0, repeats=1)
    assert r.decode_tokens_per_s > 0 and 0 < r.time_to_first_token_s < r.total_time_s
    assert r.memory_source == "process RSS"
    # The cache alone (2 x 2 layers x 256 x 4 bytes x 2 x 515 tokens ~ 4 MiB) is held until the end.
    kv = kv_layout(model.config, torch.float32).cache_bytes(512 + 3, batch=2)
    assert r.peak_memory_bytes >= 0.9 * kv, (r.peak_memory_bytes, kv)


# --------------------------------------------------------------------------------------------------
# Bad input: clear one-line errors, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------------


def test_model_that_does_not_load(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')  # no weights
    out = tmp_path / "r.json"
    result = runner.invoke(app, [str(broken), "--json", str(out)])
    assert result.exit_code != 0
    assert "cannot load model" in result.output and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(tmp_path / "missing")


def test_one_path_or_repo_id_check(tmp_path, monkeypatch):
    from gqa_uptrain.io.locate import check_model_path

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"^model .*empty is not a checkpoint folder \(no config.json\)"
    ):
        check_model_path(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="model.path .*weights.bin is a file"):
        check_model_path(tmp_path / "weights.bin", "model.path")
    for missing in (tmp_path / "missing", "./owner/name", "./gpt2", "a/b/c", "~/x", "-gpt2"):
        with pytest.raises(CheckpointError, match="does not exist; give a checkpoint folder or a Hub id"):
            check_model_path(missing)
    # Hub ids: only fetching them tells whether they exist. One-word names are the legacy canonical
    # repos (gpt2, t5-small), still what many users type.
    for hub_id in ("owner/name", "gpt2", "bert-base-uncased", "t5-small"):
        check_model_path(hub_id)
    # A local path wins over a Hub id of the same name.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="empty is not a checkpoint folder"):
        check_model_path("empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    check_model_path(tmp_path / "empty")


def test_one_trust_remote_code_rule(tmp_path):
    """Code already on this machine (a folder whose config has an auto_map) runs; a Hub repo's code
    runs only when asked for; an explicit setting always wins."""
    from gqa_uptrain.io.models import trust_remote_code_for

    ships, plain = tmp_path / "ships", tmp_path / "plain"
    for folder, config in ((ships, {"auto_map": {"AutoConfig": "x.Y"}}), (plain, {"model_type": "llama"})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert trust_remote_code_for(ships) and not trust_remote_code_for(plain)
    assert not trust_remote_code_for("owner/name")
    assert trust_remote_code_for("owner/name", True) and not trust_remote_code_for(ships, False)


@pytest.mark.parametrize(
    ("flag", "want"), [([], None), (["--trust-remote-code"], True), (["--no-trust-remote-code"], False)]
)
def test_cli_passes_the_trust_setting_to_the_loader(monkeypatch, flag, want):
    import gqa_uptrain.evaluation.run as run

    seen = []

    def fake_load(source, device, dtype, *, trust_remote_code=None):
        seen.append(trust_remote_code)
        raise CheckpointError("stop here")

    monkeypatch.setattr(run, "load_model", fake_load)
    result = runner.invoke(app, ["owner/name", "--skip-speed", *flag])
    assert result.exit_code != 0 and "stop here" in result.output and seen == [want]


def test_dataset_without_text(tmp_path, tokenizer):
    model_dir = _save(tiny_llama(2, vocab=len(tokenizer)), tokenizer, tmp_path / "m")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app, [str(model_dir), "--data", str(empty), "--skip-speed", "--context", "8", "--json", str(out)]
    )
    assert result.exit_code != 0 and "empty" in result.output
    assert not out.exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "some text"}\n')
    result = runner.invoke(app, [str(model_dir), "--data", str(rows), "--skip-speed", "--context", "8"])
    assert result.exit_code != 0 and "no column 'text'" in result.output


def test_context_longer_than_the_model_supports(tmp_path, tokenizer, trained_model_dir):
    _, text_file, _ = trained_model_dir
    model_dir = _save(tiny_llama(2, max_pos=64), None, tmp_path / "m")
    plots = tmp_path / "plots"
    result = runner.invoke(app, [str(model_dir), "--context", "100", "--plot", str(plots)])
    assert result.exit_code != 0 and "exceeds the 64 positions" in result.output
    assert not plots.exists()
    with pytest.raises(ConfigError, match="--max-length 128 exceeds"):
        evaluate(
            wrap_model(tiny_llama(2, vocab=len(tokenizer), max_pos=64), tokenizer),
            options=EvalOptions(contexts=[8], skip_speed=True, max_length=128),
            data=DataConfig(source=str(text_file)),
        )


def test_bad_option_values():
    with pytest.raises(ConfigError, match="--new-tokens"):
        evaluate(wrap_model(tiny_llama(2)), options=EvalOptions(new_tokens=1))
    result = runner.invoke(app, ["whatever", "--context", "12,abc"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output
    assert issubclass(ConfigError, GQAError)


# --------------------------------------------------------------------------------------------------
# Families without num_key_value_heads in transformers (our modelling code, loaded via auto_map)
# --------------------------------------------------------------------------------------------------


def test_converted_gpt2_with_remote_code_has_the_smaller_cache(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gqa_uptrain import convert

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(tmp_path / "orig")
    convert(tmp_path / "orig", tmp_path / "gqa", num_kv_heads=2, progress=False)
    assert "auto_map" in json.loads((tmp_path / "gqa" / "config.json").read_text())
    report = evaluate(
        tmp_path / "gqa",
        baseline=tmp_path / "orig",
        options=EvalOptions(contexts=[8], new_tokens=3, warmup=0, repeats=1, device="cpu", progress=False),
    )
    model, base = report.models
    assert (model.layout.num_kv_heads, base.layout.num_kv_heads) == (2, 4)
    assert all(c.match for c in model.kv_checks + base.kv_checks)
    assert model.kv_checks[0].allocated_bytes * 2 == base.kv_checks[0].allocated_bytes
    assert report.to_dict()["relative_to_baseline"]["kv_bytes_per_token"] == 0.5


def test_hub_model_that_cannot_be_reached(monkeypatch):
    from transformers import PretrainedConfig

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them\nmore"
        )

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", offline)
    with pytest.raises(CheckpointError) as err:
        evaluate("some-org/some-model", options=EvalOptions(skip_speed=True))
    msg = str(err.value)
    assert "some-org/some-model" in msg and "couldn't connect" in msg and "\n" not in msg
