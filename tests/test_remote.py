"""Remote paths through fsspec: the memory filesystem and a local HTTP server on 127.0.0.1 that
serves byte ranges and counts what it sends, so "only the header, then the sections needed" is
measured, not assumed."""

from __future__ import annotations

import http.server
import os
import re
import threading

import numpy as np
import pytest

import golden
from nexus_gguf import format as fmt
from nexus_gguf.errors import NxkvError

fsspec = pytest.importorskip("fsspec")

SOURCE = os.path.join(golden.version_dir(1), "files", "gemma3-high.nxkv")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support, and counts the body bytes it sends."""

    sent = 0

    def log_message(self, *args):  # quiet
        pass

    def _file(self):
        path = self.translate_path(self.path)
        return path if os.path.isfile(path) else None

    def do_HEAD(self):
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        size = os.path.getsize(path)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = (int(m.group(1)), int(m.group(2) or size - 1)) if m else (0, size - 1)
        end = min(end, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        type(self).sent += len(body)  # before the client can see it and ask the count
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_dir(tmp_path):
    handler = type("Handler", (_RangeHandler,), {"sent": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_http_reads_the_header_first_and_only_the_sections_needed(http_dir):
    pytest.importorskip("aiohttp")
    directory, url, handler = http_dir
    data = open(SOURCE, "rb").read()
    (directory / "s.nxkv").write_bytes(data)
    header, sections, size = fmt.read_header(url + "/s.nxkv")
    header_bytes = 24 + int.from_bytes(data[12:20], "little")
    assert size == len(data) and handler.sent == header_bytes  # the prelude, then the header: nothing more
    f = fmt.NxkvFile.open(url + "/s.nxkv")
    handler.sent = 0
    assert bytes(f.section("tokens")) == bytes(fmt.NxkvFile(data).section("tokens"))
    assert handler.sent == sections["tokens"].length  # one section: its bytes only
    f.verify()
    assert golden.sha256(golden.decode_file(url + "/s.nxkv")["blob"]) == golden.sha256(golden.decode_file(SOURCE)["blob"])
    with pytest.raises(FileNotFoundError):
        fmt.NxkvFile.open(url + "/missing.nxkv")


def test_damaged_remote_file_is_refused(http_dir):
    pytest.importorskip("aiohttp")
    directory, url, _ = http_dir
    data = bytearray(open(SOURCE, "rb").read())
    data[-5] ^= 0xFF
    (directory / "bad.nxkv").write_bytes(bytes(data))
    f = fmt.NxkvFile.open(url + "/bad.nxkv")
    with pytest.raises(fmt.ChecksumError):
        f.verify()
    (directory / "short.nxkv").write_bytes(bytes(data[:-100]))
    with pytest.raises(fmt.FormatError, match="truncated"):
        fmt.NxkvFile.open(url + "/short.nxkv")


def test_memory_filesystem_write_and_read():
    from nexus_gguf.storage import write_atomic

    data = open(SOURCE, "rb").read()
    n = write_atomic("memory://nxkv-test/dir/s.nxkv", [data[:100], data[100:]])
    assert n == len(data) and fsspec.filesystem("memory").ls("/nxkv-test/dir", detail=False) == ["/nxkv-test/dir/s.nxkv"]
    f = fmt.NxkvFile.open("memory://nxkv-test/dir/s.nxkv")
    f.verify()
    assert f.header == fmt.NxkvFile(data).header and f.file_bytes == len(data)


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(NxkvError, match="nosuchscheme"):
        fmt.NxkvFile.open("nosuchscheme://bucket/s.nxkv")


def test_save_and_load_through_the_memory_filesystem(smollm2_path, prompt_text):
    from conftest import logits_now, open_llama, prompt_tokens

    import nexus_gguf as ng

    llm = open_llama(smollm2_path)
    tokens = prompt_tokens(llm, prompt_text, 48)
    llm.eval(tokens)
    report = ng.save_state(llm, "memory://nxkv-test/p.nxkv", "lossless")
    assert ng.read_info("memory://nxkv-test/p.nxkv")["file_bytes"] == report.file_bytes
    llm.eval([42])
    want = logits_now(llm)
    other = open_llama(smollm2_path)
    assert ng.load_state(other, "memory://nxkv-test/p.nxkv").exact
    other.eval([42])
    assert np.array_equal(logits_now(other), want)
