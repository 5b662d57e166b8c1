"""NxkvDiskCache: llama-cpp-python's prompt cache (Llama.set_cache) with compressed states on disk.

What llama-cpp-python's own LlamaDiskCache lacks, this has: states stored as .nxkv files (a
preset's ratio, every checksum), an index that survives restarts and finds the longest stored
token prefix without reading every entry (SQLite, hashes of token prefixes), least-recently-used
eviction within capacity_bytes, entries that a hit does not remove, and several processes on one
directory (SQLite's locking, files written atomically, a vanished file read as a miss). No
`scores` matrix is stored: a restored Llama decodes its last token again before sampling, as
after its own load_state.

    cache = nexus_gguf.NxkvDiskCache("~/.cache/nexus-gguf/prompts", 4 << 30, model=llm)
    llm.set_cache(cache)
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import llama_bridge as bridge
from .errors import ConfigError, NxkvError

SMALL_PREFIXES = (1, 2, 4, 8, 16, 32)  # indexed prefix lengths below one block
BLOCK = 64  # and every multiple of it

try:  # the base class, where llama-cpp-python is installed; the cache needs it to be used anyway
    from llama_cpp.llama_cache import BaseLlamaCache
except ImportError:  # pragma: no cover - the fast test tier has no llama-cpp-python
    BaseLlamaCache = object


def _prefix_lengths(n: int) -> list[int]:
    return [k for k in SMALL_PREFIXES if k <= n] + list(range(BLOCK, n + 1, BLOCK))


def _hash(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens, "<i4").tobytes(), digest_size=16).digest()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


_LOCK_TIMEOUT_S = 60.0


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch the index to WAL (readers never wait for a writer). The switch takes an exclusive
    lock and SQLite answers "database is locked" at once, without its busy handler, while another
    process opens or switches the same new file (CI caught two writers starting together), so
    retry until the lock timeout. WAL persists in the file: later opens find it already set."""
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class NxkvDiskCache(BaseLlamaCache):
    """A llama_cpp.llama_cache.BaseLlamaCache of .nxkv files in `directory`, at most
    `capacity_bytes` of them (least recently used go first), coded with `preset` (and stage
    options as save_state takes them). Saving needs the Llama the states come from: `model=llm`
    or `bind(llm)`."""

    def __init__(self, directory, capacity_bytes: int = 2 << 30, preset: str = "high", model=None, **stage_options):
        from .pipeline import build_pipeline

        if capacity_bytes <= 0:
            raise ConfigError("capacity_bytes must be positive")
        self.capacity_bytes = int(capacity_bytes)
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pipeline = build_pipeline(preset, **stage_options)  # bad options fail here, not at the first save
        self.model = model
        self._local = threading.local()  # one SQLite connection per thread (a server's workers)
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS entries (
                id INTEGER PRIMARY KEY, file TEXT UNIQUE NOT NULL, key BLOB UNIQUE NOT NULL,
                n_tokens INTEGER NOT NULL, size INTEGER NOT NULL, last_used REAL NOT NULL, tokens BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS prefixes (hash BLOB NOT NULL, entry INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS prefixes_hash ON prefixes(hash);
            """
        )

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.directory / "index.sqlite", timeout=_LOCK_TIMEOUT_S, isolation_level=None)
            _enable_wal(db)
            self._local.db = db
        return db

    def bind(self, llm) -> "NxkvDiskCache":
        """Save the states of `llm` (the Llama this cache is set on)."""
        self.model = llm
        return self

    # ---------------------------------------------------------------- BaseLlamaCache

    @property
    def cache_size(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def __bool__(self) -> bool:
        return True  # llama-cpp-python asks `if self.cache:`; an empty cache is still a cache

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._longest_prefix(np.asarray(key, np.int32)) is not None

    def __getitem__(self, key: Sequence[int]):
        """The stored state sharing the longest prefix with `key`, as a llama_cpp LlamaState;
        KeyError if none shares a token."""
        key = np.asarray(key, np.int32)
        while True:
            found = self._longest_prefix(key)
            if found is None:
                raise KeyError("no stored prompt shares a prefix with this one")
            entry_id, path = found
            try:
                state = self._load(path)
            except FileNotFoundError:  # another process evicted it just now
                self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                continue
            self._db.execute("UPDATE entries SET last_used = ? WHERE id = ?", (time.time(), entry_id))
            return state

    def __setitem__(self, key: Sequence[int], value) -> None:
        """Store the state of the bound Llama (what `value`, its save_state(), holds), keyed by
        the tokens it really holds; then drop least recently used entries over capacity."""
        from .api import save_state

        llm = self._require_model()
        tokens = np.asarray(llm.input_ids[: llm.n_tokens], np.int32)
        if tokens.size == 0:
            return
        digest = _hash(tokens)
        name = digest.hex() + ".nxkv"
        try:
            report = save_state(llm, self.directory / name, self.pipeline)
        except (NxkvError, OSError) as e:
            # the completion the user asked for is done: a full disk must not take it away
            warnings.warn(f"nexus-gguf: the prompt cache could not store this state: {e}", RuntimeWarning, stacklevel=2)
            return
        db = self._db
        with db:  # one transaction: other processes see the entry whole or not at all
            db.execute("BEGIN IMMEDIATE")
            old = db.execute("SELECT id FROM entries WHERE key = ?", (digest,)).fetchone()
            if old:
                db.execute("DELETE FROM prefixes WHERE entry = ?", (old[0],))
                db.execute("DELETE FROM entries WHERE id = ?", (old[0],))
            cur = db.execute(
                "INSERT INTO entries (file, key, n_tokens, size, last_used, tokens) VALUES (?, ?, ?, ?, ?, ?)",
                (name, digest, int(tokens.size), report.file_bytes, time.time(), tokens.astype("<i4").tobytes()),
            )
            db.executemany("INSERT INTO prefixes (hash, entry) VALUES (?, ?)",
                                 [(_hash(tokens[:n]), cur.lastrowid) for n in _prefix_lengths(tokens.size)])
        self._evict()

    # ---------------------------------------------------------------- internals

    def _require_model(self):
        if self.model is None:
            raise NxkvError("NxkvDiskCache needs the Llama whose states it stores: NxkvDiskCache(directory, model=llm)")
        return self.model

    def _longest_prefix(self, key: np.ndarray) -> Optional[tuple[int, Path]]:
        """(entry id, file) of the entry sharing the longest prefix with key, from the index:
        the longest indexed prefix length that matches narrows the candidates, their tokens
        decide."""
        for n in reversed(_prefix_lengths(key.size)):
            rows = self._db.execute(
                "SELECT e.id, e.file, e.tokens FROM prefixes p JOIN entries e ON e.id = p.entry WHERE p.hash = ?",
                (_hash(key[:n]),),
            ).fetchall()
            if rows:
                best = max(rows, key=lambda r: _common_prefix(np.frombuffer(r[2], "<i4"), key))
                return best[0], self.directory / best[1]
        return None

    def _load(self, path: Path):
        """A llama_cpp LlamaState the bound Llama's load_state takes (a whole-context state in
        its own cache types)."""
        import llama_cpp

        from .api import decode_for
        from .format import NxkvFile

        llm = self._require_model()
        try:
            with NxkvFile.open(path) as f:
                tokens, blob = decode_for(llm, f)
        except NxkvError as e:  # damaged, or too long for this Llama's context: a miss, not a crash
            raise KeyError(f"{path}: {e}") from None
        arch = bridge.model_facts(llm).arch.encode()
        # the one sequence as the whole context (blob is bytes-like: a numpy buffer, say)
        context_blob = b"".join([len(arch).to_bytes(4, "little"), arch, memoryview(blob).cast("B")[8:]])
        input_ids = np.full(llm.n_ctx(), -1, np.intc)  # -1: no token, so no false prefix past the end
        input_ids[: tokens.size] = tokens
        return llama_cpp.llama.LlamaState(
            input_ids=input_ids, scores=np.zeros((1, llm.n_vocab()), np.single), n_tokens=int(tokens.size),
            llama_state=context_blob, llama_state_size=len(context_blob), seed=llm._seed,
        )

    def _evict(self) -> None:
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            total = self.cache_size
            doomed = []
            for entry_id, name, size in db.execute("SELECT id, file, size FROM entries ORDER BY last_used").fetchall():
                if total <= self.capacity_bytes:
                    break
                doomed.append((entry_id, name))
                total -= size
            for entry_id, _ in doomed:
                db.execute("DELETE FROM prefixes WHERE entry = ?", (entry_id,))
                db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        for _, name in doomed:
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
