"""llama.cpp's own state files, read and written byte for byte (llama-context.cpp
state_save_file / state_seq_save_file, llama.h's magics and versions):

    session file (llama_state_save_file, --prompt-cache):   u32 'ggsn', u32 10, u32 n_tokens,
                                                            i32 tokens[n_tokens], context state
    slot file (llama_state_seq_save_file, llama-server's
    --slot-save-path):                                      u32 'ggsq', u32 3, u32 n_tokens,
                                                            i32 tokens[n_tokens], sequence state
                                                            without its 8-byte head

LlamaFile.blob holds the state as llama_state_get_data / llama_state_seq_get_data give it
(what llama_state.py parses): a slot file's gets the head llama_state_seq_get_data writes
(magic, sequence 0) added on reading and dropped on writing."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import FormatError
from .llama_state import SEQ_STATE_MAGIC

_SEQ_HEAD = struct.Struct("<Ii")  # llama_state_seq_get_data's magic and sequence id

KINDS = {  # kind -> (magic, version, state blob kind)
    "session": (0x6767736E, 10, "context"),
    "slot": (0x67677371, 3, "sequence"),
}


@dataclass
class LlamaFile:
    kind: str  # "session" or "slot"
    tokens: np.ndarray  # int32
    blob: bytes  # the state, as llama_state_get_data / llama_state_seq_get_data give it

    @property
    def state_kind(self) -> str:
        return KINDS[self.kind][2]

    def to_buffers(self) -> list:
        magic, version, _ = KINDS[self.kind]
        tokens = np.ascontiguousarray(self.tokens, "<i4")
        state = self.blob[_SEQ_HEAD.size :] if self.kind == "slot" else self.blob
        return [struct.pack("<III", magic, version, tokens.size), tokens.tobytes(), state]


def read_llama_file(path) -> LlamaFile:
    """A session or slot file; FormatError for anything else, naming what it found."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12:
        raise FormatError(f"{path}: {len(data)} bytes is too short for a llama.cpp session or slot file")
    magic, version, n = struct.unpack_from("<III", data)
    for kind, (want_magic, want_version, _) in KINDS.items():
        if magic == want_magic:
            if version != want_version:
                raise FormatError(f"{path}: llama.cpp {kind} file of version {version}; this nexus-gguf reads version {want_version}")
            if 12 + 4 * n > len(data):
                raise FormatError(f"{path}: {n} tokens do not fit in the file")
            tokens = np.frombuffer(data, "<i4", count=n, offset=12).astype(np.int32)
            state = data[12 + 4 * n :]
            return LlamaFile(kind, tokens, _SEQ_HEAD.pack(SEQ_STATE_MAGIC, 0) + state if kind == "slot" else state)
    raise FormatError(f"{path}: not a llama.cpp session or slot file (magic {magic:#010x})")
