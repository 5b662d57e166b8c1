"""`nexus-gguf serve` through the `openai` client, as a real client: a long system prompt, two
requests, the server restarted between them; the second restores the first's prompt state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import nexus_gguf as ng

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'nexus-gguf[server]')")
openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, model: str, cache_dir, tmp_path):
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(ng.__file__))}
        self.log = open(tmp_path / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus_gguf.cli", "serve", model, "--cache-dir", str(cache_dir), "--port", str(self.port),
             "--n-ctx", "2048", "--threads", "2"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while True:  # bounded wait for the model to load
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(open(self.log.name).read())
                time.sleep(0.5)

    def stats(self) -> dict:
        return json.loads(urllib.request.urlopen(self.url + "/nexus-gguf/stats", timeout=10).read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_openai_client_across_a_restart(smollm2_path, prompt_text, tmp_path):
    system = prompt_text[:3000]
    usage, evaluated, seconds = [], [], []
    for question in ("Who keeps the lighthouse?", "What does the keeper write down?"):
        server = _Server(smollm2_path, tmp_path / "cache", tmp_path)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            t = time.perf_counter()
            reply = client.chat.completions.create(
                model=smollm2_path, max_tokens=8, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
            seconds.append(time.perf_counter() - t)
            assert reply.choices[0].message.content
            usage.append(reply.usage.prompt_tokens)
            stats = server.stats()
            evaluated.append(stats["evaluated_tokens"])
            assert stats["cache_entries"] >= 1 and stats["cache_bytes"] > 0
        finally:
            server.stop()
    assert usage[0] > 600 and evaluated[0] >= usage[0]  # the first server read the whole prompt
    assert evaluated[1] < 0.25 * usage[1], (usage, evaluated)  # the restarted one restored it
    assert seconds[1] < seconds[0], seconds
