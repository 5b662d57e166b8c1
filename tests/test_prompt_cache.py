"""NxkvDiskCache through llama-cpp-python's own create_completion / create_chat_completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import open_llama

import nexus_gguf as ng
from nexus_gguf.errors import NxkvError


def _counting(llm):
    """Wrap llm.eval to count the prompt tokens llama.cpp really evaluates."""
    seen = []
    real = llm.eval

    def counted(tokens):
        seen.append(len(tokens))
        return real(tokens)

    llm.eval = counted
    return seen


@pytest.fixture(scope="module")
def system_prompt(prompt_text):
    return prompt_text[:1500]


def test_restart_reuses_the_stored_prefix(smollm2_path, system_prompt, tmp_path):
    first = open_llama(smollm2_path, n_ctx=1024)
    first.set_cache(ng.NxkvDiskCache(tmp_path, 1 << 30, preset="lossless", model=first))
    want = first.create_completion(system_prompt + " Question one:", max_tokens=6, temperature=0)["choices"][0]["text"]
    cache = ng.NxkvDiskCache(tmp_path, 1 << 30, preset="lossless")  # a new process, say: the index is on disk
    assert len(cache) == 1 and cache.cache_size == sum(p.stat().st_size for p in tmp_path.glob("*.nxkv"))
    second = open_llama(smollm2_path, n_ctx=1024)
    second.set_cache(cache.bind(second))
    seen = _counting(second)
    prompt = second.tokenize((system_prompt + " Question one:").encode())
    got = second.create_completion(system_prompt + " Question one:", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert got == want  # lossless: the same text as reading the prompt
    assert sum(seen[:1]) <= 2 < len(prompt)  # only the last prompt token was decoded again
    other = second.create_completion(system_prompt + " Another question:", max_tokens=4, temperature=0)
    assert other["choices"][0]["text"] and len(cache) == 2  # both stored, the first not removed by its hit


def test_longest_prefix_lru_and_capacity(smollm2_path, tmp_path):
    llm = open_llama(smollm2_path, n_ctx=512)
    cache = ng.NxkvDiskCache(tmp_path, 1 << 30, preset="high", model=llm)
    texts = [b"alpha beta gamma delta " * 8, b"alpha beta gamma delta " * 4 + b"omega " * 20, b"zeta eta theta " * 10]
    for t in texts:
        llm.reset()
        llm.eval(llm.tokenize(t))
        cache[list(llm.input_ids[: llm.n_tokens])] = None
    sizes = sorted(p.stat().st_size for p in tmp_path.glob("*.nxkv"))
    assert len(cache) == 3
    query = llm.tokenize(b"alpha beta gamma delta " * 4 + b"omega " * 3 + b"something new")
    hit = cache[query]
    assert np.array_equal(hit.input_ids[: hit.n_tokens], llm.tokenize(texts[1]))  # the longest shared prefix
    assert query in cache and llm.tokenize(b"unrelated words") not in cache
    with pytest.raises(KeyError):
        cache[llm.tokenize(b"unrelated words")]
    # room for two: the least recently used (texts[0]; texts[1] was just hit) goes
    cache.capacity_bytes = sizes[-1] + sizes[-2]
    llm.reset()
    llm.eval(llm.tokenize(b"one more prompt to store " * 5))
    cache[list(llm.input_ids[: llm.n_tokens])] = None
    assert len(cache) <= 2 and cache.cache_size <= cache.capacity_bytes
    assert np.array_equal(cache[query].input_ids[: len(llm.tokenize(texts[1]))], llm.tokenize(texts[1]))
    assert len(list(tmp_path.glob("*.nxkv"))) == len(cache)


def test_saving_needs_the_llama(tmp_path):
    cache = ng.NxkvDiskCache(tmp_path, 1 << 20)
    with pytest.raises(NxkvError, match="model=llm"):
        cache[[1, 2, 3]] = None
    with pytest.raises(ng.ConfigError):
        ng.NxkvDiskCache(tmp_path, 1 << 20, preset="nope")


CHAT = r"""
import json, sys
sys.path[:0] = [{package_root!r}, {tests!r}]  # the nexus_gguf the tests run, installed or not
from conftest import open_llama
import nexus_gguf as ng
llm = open_llama({model!r}, n_ctx=2048)
llm.set_cache(ng.NxkvDiskCache({cache!r}, 1 << 30, model=llm))
seen = []
real = llm.eval
llm.eval = lambda tokens: (seen.append(len(tokens)), real(tokens))[1]
system = open({system!r}, encoding="utf-8").read()
messages = [{{"role": "system", "content": system}}, {{"role": "user", "content": sys.argv[1]}}]
out = llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0)
print(json.dumps({{"evaluated": sum(seen), "prompt_tokens": out["usage"]["prompt_tokens"]}}))
"""


def test_two_processes_share_one_directory(smollm2_path, system_prompt, tmp_path):
    """Two processes drive create_chat_completion through one cache directory: the second
    evaluates under 25% of its prompt because it restores the first's state."""
    system = tmp_path / "system.txt"
    system.write_text(system_prompt * 2, encoding="utf-8")
    script = tmp_path / "chat.py"
    script.write_text(CHAT.format(package_root=os.path.dirname(os.path.dirname(ng.__file__)), tests=os.path.dirname(__file__),
                                  model=smollm2_path, cache=str(tmp_path / "cache"),
                                  system=str(system)), encoding="utf-8")
    runs = []
    for question in ("What is the keeper's name?", "Where does the story happen?"):
        out = subprocess.run([sys.executable, str(script), question], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["evaluated"] >= first["prompt_tokens"] > 500
    assert second["evaluated"] < 0.25 * second["prompt_tokens"], runs


def test_entries_that_do_not_fit_are_misses_and_failures_warn(smollm2_path, tmp_path, monkeypatch):
    big = open_llama(smollm2_path, n_ctx=512)
    cache = ng.NxkvDiskCache(tmp_path, 1 << 30, preset="high", model=big)
    tokens = big.tokenize(b"a long prompt about lighthouses and ledgers " * 12)
    big.eval(tokens)
    cache[tokens] = None
    small = open_llama(smollm2_path, n_ctx=64)  # the stored prompt does not fit its context
    with pytest.raises(KeyError):
        cache.bind(small)[tokens]
    # a store that cannot write warns and leaves the completion alone
    cache.bind(big)
    monkeypatch.setattr("nexus_gguf.api.write_atomic", lambda path, buffers: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    big.reset()
    big.eval(big.tokenize(b"another prompt"))
    with pytest.warns(RuntimeWarning, match="No space left"):
        cache[list(big.input_ids[: big.n_tokens])] = None
    assert len(cache) == 1


WRITER = r"""
import sys
sys.path[:0] = [{package_root!r}, {tests!r}]
from conftest import open_llama
import nexus_gguf as ng
llm = open_llama({model!r}, n_ctx=256)
cache = ng.NxkvDiskCache({cache!r}, 1 << 30, preset="lossless", model=llm)
for i in range(5):
    llm.reset()
    llm.eval(llm.tokenize(("writer " + sys.argv[1] + " prompt " + str(i) + " ") .encode() * 4))
    cache[list(llm.input_ids[: llm.n_tokens])] = None
print("done")
"""


def test_concurrent_writers_lose_nothing(smollm2_path, tmp_path):
    """Two processes store states into one directory at the same time: every entry is indexed,
    every indexed entry's file is whole, and nothing else is left behind."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(package_root=os.path.dirname(os.path.dirname(ng.__file__)),
                                    tests=os.path.dirname(__file__), model=smollm2_path, cache=str(tmp_path / "c")))
    procs = [subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "done" in out, err
    cache = ng.NxkvDiskCache(tmp_path / "c", 1 << 30)
    files = sorted(p.name for p in (tmp_path / "c").glob("*.nxkv"))
    assert len(cache) == 10 and len(files) == 10
    assert not list((tmp_path / "c").glob(".*.tmp"))  # no temporary file left behind
    for f in files:
        ng.read_info(tmp_path / "c" / f, verify=True)  # whole and checksummed


def test_caches_opened_at_once_on_a_new_directory_all_open(tmp_path):
    """Switching a new index to WAL takes an exclusive lock that SQLite refuses at once, without
    waiting, while another connection opens the same file (CI saw two writers collide here).
    Eight openers at a time, 60 rounds: every one opens."""
    import threading

    failures = []
    for round_ in range(60):
        directory = tmp_path / str(round_)
        barrier = threading.Barrier(8)

        def open_one():
            barrier.wait()
            try:
                assert len(ng.NxkvDiskCache(directory, 1 << 20, preset="lossless")) == 0
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(repr(e))

        threads = [threading.Thread(target=open_one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
