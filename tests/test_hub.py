"""Publishing to the Hub: folder checks, the model card, the upload at the network boundary, the token.

Nothing here reaches the network: ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` are
replaced by recorders, and every test runs with a fake token in ``HF_TOKEN`` and the login cache
pointed at an empty folder, so a real login on the machine can neither be used nor leak.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _hub_fakes import FakeHub, use_fake_login
from conftest import tiny_config
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from gqa_uptrain import CheckpointError, ConfigError, convert
from gqa_uptrain.cli.convert import app as convert_app
from gqa_uptrain.cli.export import app as export_app
from gqa_uptrain.hub.card import parse_eval_json, pick_eval_entry, validate_card
from gqa_uptrain.hub.publish import HubError, push_folder

FAKE_TOKEN = "hf_FAKEtoken1234567890"
REPO = "someone/tiny-llama-gqa2"


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level fast tokenizer (no download), saved the way transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        "<unk>": 3,
        **{w: 4 + i for i, w in enumerate(["the", "a", "of", "to", "gqa"])},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory) -> Path:
    """A tiny Llama (4 K/V heads, sharded, with a tokenizer) converted to GQA-2 by gqa_uptrain.convert."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=32, num_heads=4, num_kv_heads=4))
    src = root / "src"
    model.save_pretrained(src)
    save_tokenizer(src)
    out = root / "llama-gqa2"
    convert(src, out, 2, progress=False, max_shard_size="40KB", command="gqa-convert src llama-gqa2 -g 2")
    return out


@pytest.fixture
def folder(converted_once, tmp_path) -> Path:
    """A fresh copy of the converted checkpoint (tests write its card or break it)."""
    return Path(shutil.copytree(converted_once, tmp_path / "llama-gqa2"))


@pytest.fixture(autouse=True)
def fake_login(tmp_path, monkeypatch):
    use_fake_login(tmp_path, monkeypatch, FAKE_TOKEN)


def run_cli(app, args: list[str]):
    result = CliRunner().invoke(app, args)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def write_eval_json(path: Path, folder: Path) -> Path:
    """gqa-eval output measuring the original and this model (nested perplexity objects)."""
    data = {
        "models": [
            {"model": "someone/tiny-llama", "perplexity": {"perplexity": 31.5, "tokens_scored": 4096}},
            {
                "model": str(folder),
                "perplexity": {"perplexity": 35.25, "tokens_scored": 4096},
                "dataset": {"source": "wikitext", "split": "test"},
            },
        ],
        "dataset": "python-docs",
    }
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def test_card_complete_and_valid_on_converted_model(folder, tmp_path):
    """Dry run: the card ModelCard parses carries base_model, library, tags, datasets, model-index
    (this model's row from the eval JSON) and a body recording the conversion; nothing is written."""
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    eval_json = write_eval_json(tmp_path / "eval.json", folder)
    result = push_folder(
        folder,
        REPO,
        dry_run=True,
        eval_json=eval_json,
        datasets=["HuggingFaceFW/fineweb-edu"],
        base_model="someone/tiny-llama",
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # a dry run writes nothing

    card = ModelCard(str(result.plan.card))
    d = card.data
    assert d.base_model == "someone/tiny-llama"
    assert d.library_name == "transformers"
    assert {"gqa", "llama"} <= set(d.tags)
    assert d.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert d.model_name == "tiny-llama-gqa2"
    (r,) = d.eval_results
    assert (r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) == (
        "perplexity",
        35.25,
        "wikitext",
        "test",
    )
    body = card.text
    assert "| key/value heads | 4 | 2 |" in body and "**mean** method" in body and "50.0% smaller" in body
    assert "gqa-convert src llama-gqa2 -g 2" in body  # the exact conversion command
    assert (
        "| someone/tiny-llama | n/a | n/a | python-docs | 31.500 | 4,096 |" in body
    )  # the original, for comparison
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in body and "trust_remote_code" not in body
    assert validate_card(card) == []

    names = [f.path for f in result.plan.files]
    assert names == sorted(names) and "model.safetensors.index.json" in names and "README.md" in names
    shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert set(shards) <= set(names) and len(set(shards)) > 1
    sizes = {f.path: f.size for f in result.plan.files}
    assert sizes["config.json"] == (folder / "config.json").stat().st_size
    assert sizes["README.md"] == len(str(result.plan.card).encode())


@pytest.mark.slow
def test_card_from_real_gqa_eval_json(folder, converted_once, tmp_path, monkeypatch):
    """gqa-eval's own JSON (model + baseline, perplexity on a local text file) becomes model-index."""
    from gqa_uptrain.data import DataConfig
    from gqa_uptrain.evaluation.report import write_json
    from gqa_uptrain.evaluation.run import EvalOptions, evaluate

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    text = tmp_path / "text.txt"
    text.write_text("the a of to gqa the a of\nto the a gqa\n" * 40)
    opts = EvalOptions(contexts=(8,), skip_speed=True, max_length=16, device="cpu", progress=False)
    report = evaluate(
        folder, baseline=converted_once.parent / "src", data=DataConfig(source=str(text)), options=opts
    )
    eval_json = write_json(report, tmp_path / "eval.json")

    card = ModelCard(str(push_folder(folder, REPO, dry_run=True, eval_json=eval_json).plan.card))
    (r,) = card.data.eval_results
    assert r.metric_type == "perplexity" and r.metric_value == round(report.model.perplexity.perplexity, 4)
    # Local paths are named by their last component: the card names no folder of this machine.
    assert (r.dataset_type, r.dataset_name, r.dataset_split) == ("text", text.name, "train")
    assert f"**{folder.name}** (this model) | 2 | 256 B |" in card.text  # GQA-2: half the original's KV cache
    assert str(tmp_path) not in str(card)
    assert "| 4 | 512 B |" in card.text  # the baseline's row


def test_validate_card_errors_and_warnings():
    ok = "---\nlibrary_name: transformers\ntags: [gqa]\nbase_model: a/b\n---\n# x\n"
    assert validate_card(ok) == [
        "the card does not record the conversion (no gqa-uptrain conversion section)"
    ]
    assert any("base_model" in w for w in validate_card(ok.replace("base_model: a/b\n", "")))
    with pytest.raises(CheckpointError, match="no 'gqa' tag"):
        validate_card(ok.replace("[gqa]", "[llama]"))
    with pytest.raises(CheckpointError, match="library_name"):
        validate_card(ok.replace("transformers", "timm"))
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        validate_card(ok.replace("a/b", "/home/me/model"))
    with pytest.raises(CheckpointError, match="front matter is invalid"):
        validate_card(ok.replace("tags: [gqa]", "model-index: [{results: 3}]\ntags: [gqa]"))


def test_eval_json_shapes_and_model_choice(tmp_path):
    # The documented minimal schema.
    (e,) = parse_eval_json({"model": "m", "perplexity": 12.0, "dataset": "d/x"})
    assert (e.model, e.perplexity, e.dataset) == ("m", 12.0, "d/x")
    # A list of models with nested results; speed-only entries are skipped.
    entries = parse_eval_json(
        [{"model": str(tmp_path / "a"), "perplexity": {"perplexity": 9.0}}, {"model": "b", "speed": []}]
    )
    assert len(entries) == 1
    assert pick_eval_entry(entries, tmp_path / "a").perplexity == 9.0
    two = parse_eval_json([{"model": "x", "perplexity": 1.0}, {"model": "y", "perplexity": 2.0}])
    assert (
        pick_eval_entry(parse_eval_json({"model": REPO, "perplexity": 4.0}), tmp_path / "a", REPO).perplexity
        == 4.0
    )
    # Another model's numbers are never published as this one's.
    with pytest.raises(ConfigError, match="measures x, y, not"):
        pick_eval_entry(two, tmp_path / "a")
    with pytest.raises(ConfigError, match="measures m, not"):
        pick_eval_entry(parse_eval_json({"model": "m", "perplexity": 1.0}), tmp_path / "a")
    with pytest.raises(ConfigError, match="no perplexity"):
        parse_eval_json({"model": "m", "perplexity": float("nan")})


def test_remote_code_family(converted_once, tmp_path, monkeypatch):
    """GPT-2 has no GQA in transformers: the checkpoint ships code through auto_map, the folder check
    registers our classes (as every entry point that loads a checkpoint does) and still loads the
    config with trust_remote_code, the card says how to load it, and the code must be uploaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import gqa_uptrain.modeling

    registered = []
    real_register = gqa_uptrain.modeling.register_auto_classes
    monkeypatch.setattr(
        gqa_uptrain.modeling, "register_auto_classes", lambda: registered.append(1) or real_register()
    )

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(src)
    save_tokenizer(src)
    out = tmp_path / "gpt2-gqa2"
    convert(src, out, 2, progress=False)
    assert json.loads((out / "config.json").read_text())["auto_map"]

    result = push_folder(out, "someone/gpt2-gqa2", dry_run=True, base_model="openai-community/gpt2")
    card = ModelCard(str(result.plan.card))
    assert 'AutoModelForCausalLM.from_pretrained("someone/gpt2-gqa2", trust_remote_code=True)' in card.text
    assert {"gqa", "gpt2"} <= set(card.data.tags) and validate_card(card) == []
    assert "modeling_gpt2_gqa.py" in [f.path for f in result.plan.files]
    assert registered
    with pytest.raises(CheckpointError, match=r"auto_map needs modeling_gpt2_gqa\.py"):
        push_folder(out, "someone/gpt2-gqa2", dry_run=True, exclude=["modeling_*.py"])


# --------------------------------------------------------------------------------------------
# Upload at the network boundary
# --------------------------------------------------------------------------------------------


def test_upload_calls_and_arguments(folder, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    eval_json = write_eval_json(tmp_path / "eval.json", folder)
    res, out = run_cli(
        export_app,
        [str(folder), REPO, "--private", "--revision", "gqa-2", "--commit-message", "GQA-2 of tiny llama"]
        + ["--eval-json", str(eval_json), "--base-model", "someone/tiny-llama", "--dataset", "wikitext"],
    )
    assert res.exit_code == 0, out
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    assert hub.kwargs("create_repo") == {
        "repo_id": REPO,
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    assert hub.kwargs("create_branch") == {
        "repo_id": REPO,
        "branch": "gqa-2",
        "repo_type": "model",
        "exist_ok": True,
    }
    up = hub.kwargs("upload_folder")
    assert up["repo_id"] == REPO and Path(up["folder_path"]) == folder.resolve()
    assert (up["revision"], up["create_pr"], up["commit_message"]) == ("gqa-2", False, "GQA-2 of tiny llama")
    assert hub.tokens == [FAKE_TOKEN]  # the token reaches HfApi, and only HfApi
    assert "https://huggingface.co/someone/tiny-llama-gqa2/tree/gqa-2" in res.stdout
    # The card was written before the upload, so the uploaded README is the complete card.
    card = ModelCard(hub.card_at_upload)
    assert card.data.eval_results[0].metric_value == 35.25 and card.data.datasets == ["wikitext"]
    assert (folder / "README.md").read_text() == hub.card_at_upload


def test_create_pr_and_default_branch(folder, monkeypatch):
    hub = FakeHub(monkeypatch)
    result = push_folder(folder, REPO, create_pr=True)
    assert hub.names() == ["create_repo", "upload_folder"]  # no branch to create for a PR
    up = hub.kwargs("upload_folder")
    assert up["create_pr"] is True and up["revision"] is None and up["commit_message"].startswith("Upload")
    assert hub.kwargs("create_repo")["private"] is None  # an existing repo keeps its visibility
    assert result.url == result.pr_url == "https://huggingface.co/someone/tiny-llama-gqa2/discussions/1"
    with pytest.raises(ConfigError, match="cannot be combined with --revision"):
        push_folder(folder, REPO, create_pr=True, revision="dev")
    # Resuming into an open pull request: commit to its ref, no branch created.
    assert push_folder(folder, REPO, revision="refs/pr/1").url.endswith("/tiny-llama-gqa2/discussions/1")
    assert hub.names().count("create_branch") == 0


def test_network_failure_then_rerun(folder, monkeypatch):
    """A failed upload exits non-zero saying a re-run resumes; the re-run succeeds with the same card."""
    hub = FakeHub(monkeypatch, fail=ConnectionError("Connection reset by peer"))
    res, out = run_cli(export_app, [str(folder), REPO])
    assert res.exit_code == 2 and "Traceback" not in out
    assert "network failure" in out and "re-run the same command to resume" in out
    first_card = hub.card_at_upload
    res, out = run_cli(export_app, [str(folder), REPO])
    assert res.exit_code == 0, out
    assert hub.names().count("upload_folder") == 2
    assert hub.card_at_upload == first_card  # updating the card twice changes nothing
    assert first_card.count("<!-- gqa-uptrain:usage -->") == 1


def test_http_errors_are_one_line(folder, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def http_error(status: int) -> HfHubHTTPError:
        request = httpx2.Request(
            "POST", "https://huggingface.co/api/models/someone/tiny-llama-gqa2/commit/main"
        )
        return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))

    FakeHub(monkeypatch, fail=http_error(401))
    with pytest.raises(HubError, match="rejected the token"):
        push_folder(folder, REPO)
    FakeHub(monkeypatch, fail=http_error(503))
    with pytest.raises(HubError, match="failed \\(503.*re-run the same command to resume"):
        push_folder(folder, REPO)


# --------------------------------------------------------------------------------------------
# The token
# --------------------------------------------------------------------------------------------


def test_token_never_printed_or_written(folder, tmp_path, monkeypatch):
    """The fake token appears in no output (success, dry run, failures), no file, no exception."""
    hub = FakeHub(monkeypatch)
    outputs = []
    for args in ([str(folder), REPO, "-v"], [str(folder), REPO, "--dry-run", "-v"]):
        res, out = run_cli(export_app, args)
        assert res.exit_code == 0, out
        outputs.append(out)
    # A failure whose message carries the token (as a careless HTTP layer might) is scrubbed.
    hub.fail = ConnectionError(f"proxy refused Authorization: Bearer {FAKE_TOKEN}")
    res, out = run_cli(export_app, [str(folder), REPO])
    assert res.exit_code == 2
    outputs.append(out)
    hub.fail = ConnectionError(f"proxy refused Authorization: Bearer {FAKE_TOKEN}")
    with pytest.raises(HubError) as info:
        push_folder(folder, REPO)
    assert FAKE_TOKEN not in str(info.value) and info.value.__cause__ is None and "***" in str(info.value)
    assert all(FAKE_TOKEN not in o for o in outputs)
    assert files_containing(tmp_path, FAKE_TOKEN) == []
    assert hub.tokens and set(hub.tokens) == {FAKE_TOKEN}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_no_token(folder, monkeypatch):
    hub = FakeHub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN")
    res, out = run_cli(export_app, [str(folder), REPO])
    assert res.exit_code == 2 and "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in out
    assert hub.calls == []
    # A dry run still works, and says the real run would need a token.
    res, out = run_cli(export_app, [str(folder), REPO, "--dry-run"])
    assert res.exit_code == 0 and "no Hugging Face token found" in out


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        ("tiny-llama", "must be OWNER/NAME"),
        ("a/b/c", "must be OWNER/NAME"),
        ("me/bad name", "alphanumeric"),
        ("me/x--y", "--"),
    ],
)
def test_invalid_repo_id(folder, monkeypatch, repo_id, message):
    hub = FakeHub(monkeypatch)
    res, out = run_cli(export_app, [str(folder), repo_id])
    assert res.exit_code == 2 and message in out and "Traceback" not in out
    assert hub.calls == []


def test_one_repo_id_check():
    """The push target check lives with the path-or-repo-id check; the hub names are that function."""
    import gqa_uptrain.hub
    import gqa_uptrain.hub.publish
    from gqa_uptrain.io.locate import check_repo_id

    assert gqa_uptrain.hub.check_repo_id is check_repo_id is gqa_uptrain.hub.publish.check_repo_id
    assert check_repo_id("me/model") == "me/model"
    with pytest.raises(ConfigError, match="recipe key output.push_to_hub: 'me' must be OWNER/NAME"):
        check_repo_id("me", "recipe key output.push_to_hub:")


def test_incomplete_or_unsafe_folders_refused(folder, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]

    # A shard left out of the upload, then missing on disk.
    with pytest.raises(
        CheckpointError, match=f"shard {shard} named in model.safetensors.index.json is not in the upload"
    ):
        push_folder(folder, REPO, exclude=[shard])
    moved = tmp_path / shard
    shutil.move(folder / shard, moved)
    res, out = run_cli(export_app, [str(folder), REPO])
    assert res.exit_code == 2 and f"shard {shard}" in out and "incomplete" in out
    # A truncated shard.
    (folder / shard).write_bytes(moved.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        push_folder(folder, REPO)
    shutil.move(moved, folder / shard)

    # A pickle among the files: refused unless excluded or allowed.
    torch.save({"step": 1}, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is a pickle.*--allow-pickle"):
        push_folder(folder, REPO, dry_run=True)
    assert "optimizer.pt" not in [
        f.path for f in push_folder(folder, REPO, dry_run=True, exclude=["*.pt"]).plan.files
    ]
    assert "optimizer.pt" in [
        f.path for f in push_folder(folder, REPO, dry_run=True, allow_pickle=True).plan.files
    ]
    (folder / "optimizer.pt").unlink()

    # No tokenizer, then a config transformers cannot load.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).rename(tmp_path / name)
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        push_folder(folder, REPO)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).rename(folder / name)
    (folder / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(CheckpointError, match="config.json does not load with transformers"):
        push_folder(folder, REPO)
    with pytest.raises(CheckpointError, match="is not a folder"):
        push_folder(tmp_path / "nowhere", REPO)
    assert hub.calls == []


# --------------------------------------------------------------------------------------------
# gqa-convert --push-to-hub
# --------------------------------------------------------------------------------------------


def test_convert_push_to_hub(converted_once, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    src = converted_once.parent / "src"
    out = tmp_path / "mqa"
    res, text = run_cli(
        convert_app, [str(src), str(out), "-g", "1", "--quiet", "--push-to-hub", "someone/tiny-mqa"]
    )
    assert res.exit_code == 0, text
    assert hub.names() == ["create_repo", "upload_folder"]
    assert Path(hub.kwargs("upload_folder")["folder_path"]) == out.resolve()
    assert "https://huggingface.co/someone/tiny-mqa" in text
    card = ModelCard(hub.card_at_upload)
    assert "## Conversion to MQA" in card.text and 'from_pretrained("someone/tiny-mqa")' in card.text
    assert {"gqa", "mqa", "llama"} <= set(card.data.tags)

    # No token: refused before converting anything.
    monkeypatch.delenv("HF_TOKEN")
    res, text = run_cli(
        convert_app, [str(src), str(tmp_path / "mqa2"), "-g", "1", "--push-to-hub", "someone/tiny-mqa"]
    )
    assert res.exit_code == 2 and "no Hugging Face token" in text
    assert not (tmp_path / "mqa2").exists()


def test_export_help_lists_options():
    res, out = run_cli(export_app, ["--help"])
    assert res.exit_code == 0
    for opt in (
        "--private",
        "--revision",
        "--create-pr",
        "--commit-message",
        "--eval-json",
        "--dry-run",
        "HF_TOKEN",
    ):
        assert opt in out
    assert "--token" not in out
