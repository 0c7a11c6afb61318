"""The vocabulary stored in a GGUF file, read without loading the model.

``gguf_vocab_fingerprint(path)`` hashes the raw token strings of ``tokenizer.ggml.tokens`` in
id order with :func:`fingerprint_vocabulary`. Both GGUF-backed engines (llama.cpp and
transformers) fingerprint these same strings, so a harness can refuse a draft/target pair whose
vocabularies differ before it loads either model.

The header is walked directly (key/value section only, stopping at the tokens array) rather
than with ``gguf.GGUFReader``, which parses every field and tensor and takes ~15 s on a
Qwen2.5 file with its 150k tokens and merges; this takes a fraction of a second. The tests
check it against ``GGUFReader``.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from systems.engines.base import EngineError, fingerprint_vocabulary

TOKENS_KEY = "tokenizer.ggml.tokens"

# GGUF value types: fixed-size scalars by struct code; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos = buf, order, 0

    def scalar(self, code: str):
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> bytes:
        n = self.scalar("Q")
        self.pos += n
        if self.pos > len(self.buf):
            raise EngineError("GGUF header runs past the end of the file")
        return bytes(self.buf[self.pos - n : self.pos])

    def skip(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            n = self.scalar("Q")  # read before adding: scalar() moves pos
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(count):
                    self.skip(etype)
        else:
            raise EngineError(f"unknown GGUF value type {vtype}")


def gguf_vocab_tokens(path: str | Path) -> list[bytes]:
    """The raw token strings stored in a GGUF file (``tokenizer.ggml.tokens``), in id order."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"GGUF file not found: {path}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise EngineError(f"{path} is not a GGUF file")
        # The version is a small number; read in the wrong byte order it is huge.
        order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        cur = _Cursor(buf, order)
        cur.pos = 4
        version = cur.scalar("I")
        if version < 2:
            raise EngineError(f"{path}: GGUF version {version} is not supported")
        cur.scalar("Q")  # tensor count
        n_kv = cur.scalar("Q")
        try:
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.scalar("I")
                if key == TOKENS_KEY.encode() and vtype == _ARRAY:
                    etype, count = cur.scalar("I"), cur.scalar("Q")
                    if etype != _STRING:
                        raise EngineError(f"{path}: {TOKENS_KEY} is not an array of strings")
                    return [cur.string() for _ in range(count)]
                cur.skip(vtype)
        except struct.error as exc:
            raise EngineError(f"{path}: truncated GGUF header ({exc})") from exc
    raise EngineError(f"{path} stores no vocabulary ({TOKENS_KEY})")


def gguf_vocab_fingerprint(path: str | Path) -> str:
    """Fingerprint of a GGUF file's stored vocabulary; equal for models sharing a vocabulary."""
    return fingerprint_vocabulary(gguf_vocab_tokens(path))
