"""A folder's content as a hash: what a file computed from a model records, so that a later run reuses it
only for the same model (reference scores, mined rows).  Safetensors files hash their tensors' bytes,
not their headers' byte order."""
from __future__ import annotations

import json
import os
import struct

_FINGERPRINT_FILES = (".safetensors", ".json", ".model", ".txt")
_SAMPLES, _BLOCK, _SMALL_TENSOR = 64, 1 << 16, 1 << 20


def _hash_safetensors(h, f, size: int):
    """The header (names, dtypes, shapes), every tensor of at most 1 MiB (norms, biases: a change
    to one of them alone would slip between samples) and 64 blocks spread over the data."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = f.read(n)
    h.update(header)
    start = 8 + n
    for name, info in sorted(json.loads(header).items()):
        if name != "__metadata__" and info["data_offsets"][1] - info["data_offsets"][0] <= _SMALL_TENSOR:
            f.seek(start + info["data_offsets"][0])
            h.update(f.read(info["data_offsets"][1] - info["data_offsets"][0]))
    for i in range(_SAMPLES):
        f.seek(start + i * max(0, size - start - _BLOCK) // (_SAMPLES - 1))
        h.update(f.read(_BLOCK))


def hash_folder(h, folder: str):
    """Adds a model folder's weights (sampled: _hash_safetensors), configs and tokenizer files to ``h``."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith(_FINGERPRINT_FILES):
            size = os.path.getsize(path)
            h.update(f"{name}:{size}".encode())
            with open(path, "rb") as f:
                if name.endswith(".safetensors"):
                    _hash_safetensors(h, f, size)
                else:  # configs and tokenizer files: small, hashed whole
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
