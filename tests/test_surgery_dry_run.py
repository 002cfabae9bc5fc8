"""`--dry-run` on hub ids reads config.json and the safetensors headers only: tested against a local stand-in for
the Hugging Face hub (its file endpoint, with byte ranges), through the real huggingface_hub client, offline."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from surgery_pairs import BASE, DONOR

from surgery.cli import main as surgery_main

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<file>.+)$")
# huggingface_hub reads the first 100 kB of a shard in one request and parses the header from it
FIRST_READ = 100_001


class FakeHub(ThreadingHTTPServer):
    """Serves model folders at the hub's /{repo}/resolve/{revision}/{file}, and records every request."""

    def __init__(self, repos: dict[str, Path]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self.bytes_sent: dict[str, int] = {}  # file path -> bytes of it sent

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _file(self) -> Path | None:
        match = RESOLVE.match(self.path)
        if match is None or match["repo"] not in self.server.repos:
            return None
        file = self.server.repos[match["repo"]] / match["file"]
        return file if file.is_file() else None

    def _answer(self, with_body: bool) -> None:
        self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        file = self._file()
        if file is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if RESOLVE.match(self.path) else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        start, stop, status = 0, len(data), 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ranged:
            start = int(ranged[1])
            stop = min(int(ranged[2]) + 1, len(data)) if ranged[2] else len(data)
            status = 206
        self.send_response(status)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if with_body:
            self.wfile.write(data[start:stop])
            self.server.bytes_sent[str(file)] = self.server.bytes_sent.get(str(file), 0) + stop - start

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)


@pytest.fixture
def fake_hub(tiny_llama):
    # a sharded base (the index path of huggingface_hub) and a single-file donor of 3 MB (vocab 8000)
    base = tiny_llama("base", **BASE, vocab_size=8000, max_shard_size="200KB")
    donor = tiny_llama("donor", **DONOR, vocab_size=8000)
    hub = FakeHub({"org/base": base, "org/donor": donor})
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub, base, donor
    hub.shutdown()
    hub.server_close()


def test_dry_run_on_hub_ids_reads_only_config_and_headers(fake_hub, tmp_path, capsys):
    hub, base, donor = fake_hub
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_TOKEN", None)
    out = tmp_path / "out"
    flags = ["--out", str(out), "--dry-run", "--num-hidden-layers", "5"]
    result = subprocess.run([sys.executable, "-m", "surgery", "--base", "org/base", "--donor", "org/donor", *flags],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.exists()

    # the plan is the one the local folders give, from "where each output layer comes from" on
    assert surgery_main(["--base", str(base), "--donor", str(donor), *flags]) == 0
    local_plan = capsys.readouterr().out
    start = "where each output layer comes from:"
    assert result.stdout[result.stdout.index(start):].split("\noutput:")[0] == (
        local_plan[local_plan.index(start):].split("\noutput:")[0])

    # nothing but config.json, the index and the headers: no listing of the repo (snapshot_download asks the
    # API for one), no weight file fetched whole, and of each only the header read's first 100 kB
    assert not [path for _, path, _ in hub.requests if path.startswith("/api/")]
    weight_gets = [(path, ranged) for method, path, ranged in hub.requests
                   if method == "GET" and path.endswith(".safetensors")]
    assert weight_gets and all(ranged == f"bytes=0-{FIRST_READ - 1}" for _, ranged in weight_gets), weight_gets
    donor_file = donor / "model.safetensors"
    assert donor_file.stat().st_size > 10 * FIRST_READ
    assert hub.bytes_sent[str(donor_file)] == FIRST_READ
    cached = [p.name for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    assert not [name for name in cached if name.endswith(".safetensors")], cached
    assert "config.json" in cached


def test_dry_run_on_an_unreachable_hub_is_one_line(tmp_path, capsys):
    # the tests run with HF_HUB_OFFLINE=1 (conftest), so the hub cannot be asked
    out = tmp_path / "out"
    code = surgery_main(["--base", "org/base", "--donor", "random", "--out", str(out), "--dry-run",
                         "--hidden-size", "48"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot fetch org/base from the Hugging Face hub ("), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
