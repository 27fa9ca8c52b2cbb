"""``gqa-uptrain --push-to-hub`` / ``output.push_to_hub``: checked before training, uploaded after.

Nothing reaches the network: ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` are replaced
by recorders, and every test runs with a fake token in ``HF_TOKEN`` and the login cache pointed at an
empty folder, so a real login on the machine can neither be used nor leak.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from _hub_fakes import FakeHub, use_fake_login
from _uptrain_fixtures import build_world, tiny_recipe
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from gqa_uptrain.cli.uptrain import app
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.hub.publish import HubError
from gqa_uptrain.training import loop
from gqa_uptrain.training.config import config_from_dict

FAKE_TOKEN = "hf_FAKEuptrainToken0987654321"
REPO_ID = "someone/tiny-uptrained"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("uptrain-hub"))


@pytest.fixture(autouse=True)
def fake_login(tmp_path, monkeypatch):
    use_fake_login(tmp_path, monkeypatch, FAKE_TOKEN)


def write_recipe(world: Path, tmp_path: Path, **sections) -> tuple[Path, Path]:
    out = tmp_path / "run"
    sections.setdefault("budget", {"steps": 2})
    sections.setdefault("checkpoint", {"every": 0})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(world, out, **sections)))
    return path, out


def invoke(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_push_uploads_the_final_model_after_training(world, tmp_path, monkeypatch, caplog):
    hub = FakeHub(monkeypatch)
    recipe, out = write_recipe(world, tmp_path)
    caplog.set_level(logging.DEBUG)
    code, text = invoke([recipe, "--push-to-hub", REPO_ID, "output.hub_private=true", "-v"])
    assert code == 0, text
    assert hub.names() == ["create_repo", "upload_folder"]
    assert hub.kwargs("create_repo")["repo_id"] == REPO_ID and hub.kwargs("create_repo")["private"] is True
    upload = hub.kwargs("upload_folder")
    assert upload["repo_id"] == REPO_ID and upload["revision"] is None
    assert Path(upload["folder_path"]) == (out / "model").resolve()
    assert "uptrained with gqa-uptrain" in upload["commit_message"]
    # The uploaded folder is the trained model, complete, with the card the Hub will show.
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(hub.uploaded)
    assert hub.uploaded["model.safetensors"] == (out / "model" / "model.safetensors").read_bytes()
    card = ModelCard(hub.uploaded["README.md"].decode())
    assert "## Uptraining" in card.text and f'from_pretrained("{REPO_ID}")' in card.text
    assert {"gqa", "uptrained"} <= set(card.data.tags)
    assert f"https://huggingface.co/{REPO_ID}" in text
    # The token went to HfApi and nowhere else: not printed, not logged (debug), not written.
    assert hub.tokens and set(hub.tokens + hub.upload_tokens) == {FAKE_TOKEN}
    assert FAKE_TOKEN not in text and FAKE_TOKEN not in caplog.text
    assert files_containing(tmp_path, FAKE_TOKEN) == []


def test_push_to_a_branch_from_the_recipe(world, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    cfg = config_from_dict(
        tiny_recipe(
            world,
            tmp_path / "run",
            budget={"steps": 1},
            checkpoint={"every": 0},
            eval={"at_start": False},
            output={"push_to_hub": REPO_ID, "hub_revision": "uptrained"},
        )
    )
    result = loop.uptrain(cfg)
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    assert hub.kwargs("create_branch")["branch"] == "uptrained"
    assert hub.kwargs("upload_folder")["revision"] == "uptrained"
    assert hub.kwargs("create_repo")["private"] is None  # not asked: an existing repo keeps its visibility
    assert result.hub_url == f"https://huggingface.co/{REPO_ID}/tree/uptrained"


def test_missing_token_or_bad_repo_fails_before_training(world, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    started = []
    monkeypatch.setattr(loop, "setup", lambda *a, **k: started.append(1))
    recipe, out = write_recipe(world, tmp_path)

    monkeypatch.delenv("HF_TOKEN")
    code, text = invoke([recipe, "--push-to-hub", REPO_ID])
    assert code == 2 and "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in text
    assert "Traceback" not in text
    code, text = invoke([recipe, "--push-to-hub", REPO_ID, "--check"])
    assert code == 2 and "no Hugging Face token" in text

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    code, text = invoke([recipe, "--push-to-hub", "tiny-uptrained"])
    assert code == 2 and "recipe key output.push_to_hub: 'tiny-uptrained' must be OWNER/NAME" in text
    # Nothing was trained, nothing touched the run folder or the network.
    assert started == [] and not out.exists() and hub.calls == []

    # A previous run is not cleared by --overwrite when the push target is refused.
    (out / "model").mkdir(parents=True)
    (out / "recipe.yaml").write_text("old run\n")
    monkeypatch.delenv("HF_TOKEN")
    code, text = invoke([recipe, "--push-to-hub", REPO_ID, "--overwrite"])
    assert code == 2 and (out / "recipe.yaml").read_text() == "old run\n" and started == []

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    code, text = invoke([recipe, "--push-to-hub", REPO_ID, "--check"])
    assert code == 0 and f"push target ok: {REPO_ID}" in text and FAKE_TOKEN not in text


def test_failed_upload_keeps_the_model_and_says_how_to_publish(world, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, fail=ConnectionError(f"proxy refused Authorization: Bearer {FAKE_TOKEN}"))
    recipe, out = write_recipe(world, tmp_path)
    code, text = invoke([recipe, "--push-to-hub", REPO_ID])
    text = " ".join(text.split())
    assert code == 2, text
    assert "network failure while uploading to someone/tiny-uptrained" in text
    assert f"gqa-export {out / 'model'} {REPO_ID}" in text
    assert FAKE_TOKEN not in text and "***" in text
    assert (out / "model" / "model.safetensors").is_file() and (out / "results.json").is_file()
    assert not (out / ".lock").exists()
    assert hub.names() == ["create_repo", "upload_folder"]
    assert files_containing(tmp_path, FAKE_TOKEN) == []


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"push_to_hub": "a/b/c"}, "recipe key output.push_to_hub: 'a/b/c' must be OWNER/NAME"),
        (
            {"push_to_hub": "me/bad name"},
            "recipe key output.push_to_hub: 'me/bad name' is not a valid Hub repo id",
        ),
        ({"hub_private": True}, "recipe key output.hub_private: only applies with output.push_to_hub"),
        ({"hub_revision": "dev"}, "recipe key output.hub_revision: only applies with output.push_to_hub"),
    ],
)
def test_hub_recipe_keys_are_validated(tmp_path, output, message):
    data = {
        "model": {"path": "m"},
        "data": {"source": "c.txt"},
        "budget": {"steps": 1},
        "output": {"dir": "o", **output},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_help_lists_push_options():
    code, text = invoke(["--help"])
    assert code == 0
    assert "--push-to-hub" in text and "HF_TOKEN" in text and "--token" not in text


def test_hub_error_class_survives_the_broadcast(world, tmp_path, monkeypatch):
    """The main process's HubError reaches the caller as a HubError (what every rank raises)."""
    monkeypatch.delenv("HF_TOKEN")
    cfg = config_from_dict(tiny_recipe(world, tmp_path / "run", output={"push_to_hub": REPO_ID}))
    with pytest.raises(HubError, match="no Hugging Face token"):
        loop.uptrain(cfg)
