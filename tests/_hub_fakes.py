"""The Hub at the network boundary, shared by the export and uptraining tests.

``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` are replaced by recorders, and the
login is a known fake token with the login cache pointed at an empty folder, so a real login on the
machine can neither be used nor leak.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl


def use_fake_login(tmp_path: Path, monkeypatch, token: str) -> None:
    """``token`` in HF_TOKEN, and no login cache or OIDC that could supply a real one."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


class FakeHub:
    """Records the HfApi calls gqa_uptrain.hub.publish makes; ``fail`` makes ``upload_folder`` raise once.

    ``tokens`` holds the token each ``create_repo`` saw, ``upload_tokens`` those of the uploads;
    ``card_at_upload`` is the README an upload found, ``uploaded`` every file of the last
    successful upload.
    """

    def __init__(self, monkeypatch, fail: BaseException | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.tokens: list[str | None] = []
        self.upload_tokens: list[str | None] = []
        self.fail = fail
        self.card_at_upload: str | None = None
        self.uploaded: dict[str, bytes] = {}
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            hub.tokens.append(api.token)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kw):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(api, **kw):
            hub.calls.append(("upload_folder", kw))
            hub.upload_tokens.append(api.token)
            root = Path(kw["folder_path"])
            hub.card_at_upload = (root / "README.md").read_text()
            if hub.fail is not None:
                err, hub.fail = hub.fail, None
                raise err
            hub.uploaded = {
                p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
            }
            pr = f"https://huggingface.co/{kw['repo_id']}/discussions/1" if kw.get("create_pr") else None
            return CommitInfo(
                commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc123",
                commit_message=kw.get("commit_message") or "",
                commit_description="",
                oid="abc123",
                pr_url=pr,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(kw for n, kw in self.calls if n == name)


class FakeHubDownloads:
    """``huggingface_hub.snapshot_download`` served from local folders, laid out as the real cache.

    ``repos`` maps a repo id to the local folder playing its remote; a download copies the files
    ``allow_patterns`` admits into ``CACHE/models--OWNER--NAME/snapshots/SHA/`` and returns that
    folder, as huggingface_hub does. ``calls`` records each call's arguments.
    """

    def __init__(self, monkeypatch, cache: Path, repos: dict[str, Path]):
        import fnmatch
        import shutil

        import huggingface_hub

        self.calls: list[dict] = []
        hub = self

        def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, **kw):
            hub.calls.append(
                {"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns, **kw}
            )
            snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
            snapshot.mkdir(parents=True, exist_ok=True)
            for p in repos[repo_id].iterdir():
                if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns or ["*"]):
                    shutil.copyfile(p, snapshot / p.name)
            return str(snapshot)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
