"""``gqa-convert --dry-run`` on a Hub id plans from config.json and the safetensors headers alone.

The Hub is a real HTTP server on 127.0.0.1 serving real checkpoint folders the way the Hub serves
them (the model-info API, ``resolve`` URLs with range requests, the commit and ETag headers);
``HF_ENDPOINT`` points the real ``huggingface_hub`` client at it, in a child process as a user's
shell would. Every request is recorded, so the test can say exactly which bytes were asked for: no
byte of tensor data, whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gqa_uptrain.io.checkpoint import read_safetensors_header

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHubServer:
    """Serves ``repos`` (repo id -> local folder) at ``http://127.0.0.1:PORT`` as the Hub does, and
    records every request as ``(method, path, range header or None, bytes sent)``."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None, int]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                hub.requests.append(
                    (self.command, self.path, self.headers.get("range"), 0 if head else len(body))
                )

            def _serve(self, head: bool) -> None:
                path = self.path.split("?")[0]
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m and m.group(1) in hub.repos:
                    folder = hub.repos[m.group(1)]
                    siblings = [
                        {"rfilename": p.name, "size": p.stat().st_size} for p in sorted(folder.iterdir())
                    ]
                    body = json.dumps({"id": m.group(1), "sha": SHA, "siblings": siblings}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._send(
                        404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head
                    )
                f = hub.repos[m.group(1)] / m.group(3)
                if not f.is_file():
                    return self._send(
                        404,
                        b'{"error":"Entry not found"}',
                        {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA},
                        head,
                    )
                data = f.read_bytes()
                headers = {
                    "X-Repo-Commit": SHA,
                    "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                    "Accept-Ranges": "bytes",
                }
                rng = self.headers.get("range")
                if rng and not head:
                    a, b = rng.removeprefix("bytes=").split("-")
                    lo, hi = int(a), min(int(b), len(data) - 1)
                    headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
                    return self._send(206, data[lo : hi + 1], headers, head)
                return self._send(200, data, headers, head)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dry_run(hub: FakeHubServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``gqa-convert ... --dry-run`` in a child process whose Hub is ``hub`` (fake token, empty cache)."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_TOKEN": "hf_fake_token_for_tests",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
    }
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    code = "from gqa_uptrain.cli.convert import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--dry-run"], capture_output=True, text=True, env=env, timeout=120
    )


def _header_end(path: Path) -> int:
    """Where the tensor data of a safetensors file begins."""
    return min(i.begin for i in read_safetensors_header(path))


@pytest.mark.slow  # child processes that import torch
@pytest.mark.parametrize("shard", [None, "300KB"])
def test_hub_dry_run_reads_headers_not_weights(make_model, tmp_path, shard):
    """Single-file and sharded checkpoints: the plan printed for the Hub id equals the local folder's,
    and no request asked for a byte of tensor data."""
    folder, _ = make_model(
        "llama", num_heads=8, num_kv_heads=8, hidden=128, num_hidden_layers=2, vocab_size=2000
    )
    if shard:  # re-save sharded
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        sharded = tmp_path / "sharded"
        model.save_pretrained(sharded, max_shard_size=shard)
        folder = sharded
    weights = sorted(folder.glob("*.safetensors"))
    assert (
        len(weights) == (1 if shard is None else len(weights))
        and sum(p.stat().st_size for p in weights) > 1e6
    )

    with FakeHubServer({"org/model": folder}) as hub:
        res = _dry_run(hub, tmp_path, "org/model", str(tmp_path / "out"), "-g", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    local = _dry_run(hub, tmp_path, str(folder), str(tmp_path / "out"), "-g", "2")
    assert local.returncode == 0, local.stderr[-2000:]
    shown = res.stdout + res.stderr  # the report goes to the console (stderr)
    assert "dry run: Llama: 8 → 2 K/V heads" in shown, shown
    # The same plan (tensors, files, sizes) as from the local folder.
    plan_lines = [line for line in shown.splitlines() if "would write" in line or "parameters" in line]
    assert len(plan_lines) == 2 and plan_lines == [
        line
        for line in (local.stdout + local.stderr).splitlines()
        if "would write" in line or "parameters" in line
    ]

    # What was asked for: no weights file was fetched whole, and every range of one ends before its data.
    asked = [(m, p, r, n) for m, p, r, n in hub.requests if p.endswith(".safetensors")]
    assert asked, hub.requests
    for method, path, rng, sent in asked:
        name = path.rsplit("/", 1)[-1]
        if method == "HEAD":
            continue
        assert rng is not None, f"{name} was requested whole"
        last = int(rng.removeprefix("bytes=").split("-")[1])
        assert last < _header_end(folder / name), f"{name}: {rng} reaches tensor data"
        assert sent <= last + 1
    fetched = {p.rsplit("/", 1)[-1] for m, p, r, n in asked if m == "GET"}
    assert fetched == {p.name for p in weights}  # every shard's header, each read by range
    served = sum(n for m, p, r, n in hub.requests if p.endswith(".safetensors"))
    assert served < sum(_header_end(p) for p in weights) + 100
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a child process
def test_hub_dry_run_unknown_repo_is_one_line(make_model, tmp_path):
    folder, _ = make_model("llama", num_heads=4, num_kv_heads=4)
    with FakeHubServer({"org/model": folder}) as hub:
        res = _dry_run(hub, tmp_path, "org/missing", str(tmp_path / "out"), "-g", "2")
    assert res.returncode != 0
    message = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "org/missing" in message[0] and "not found" in message[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # a child process
def test_hub_dry_run_refuses_a_bad_target_from_headers(make_model, tmp_path):
    """The checks a plan makes (here: G must divide the K/V heads) run on the remote headers too."""
    folder, _ = make_model("llama", num_heads=4, num_kv_heads=4)
    with FakeHubServer({"org/model": folder}) as hub:
        res = _dry_run(hub, tmp_path, "org/model", str(tmp_path / "out"), "-g", "3")
    assert res.returncode != 0 and "3" in res.stderr
    assert not any(p.endswith(".safetensors") and r is None and m == "GET" for m, p, r, n in hub.requests)
