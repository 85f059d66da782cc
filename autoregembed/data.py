"""Training rows: loading, validation with file/line/field errors, and deterministic batching.

Stage-1 rows: {context, instruction, output}.
Stage-2 rows: {query, pos, neg: str | list[str], instruction}; ``neg`` is normalised to a list.

Local .jsonl files are parsed here line by line so that a malformed row is reported with
its file and line; .json, .parquet and hub datasets go through ``datasets`` and are
reported by record number.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .atomic import atomic_write_text
from .errors import InputError


class DataError(InputError):
    """A malformed training row; the message names file, line (or record) and field."""


STAGE1_FIELDS = {"context": "text", "instruction": "instruction", "output": "text"}
STAGE2_FIELDS = {"query": "text", "pos": "text", "neg": "texts", "instruction": "instruction"}


def check_row(row, fields: dict, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    out = {}
    for name, kind in fields.items():
        if name not in row or row[name] is None:
            raise DataError(f"{where}: missing field '{name}'")
        value = row[name]
        if kind == "texts":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value:
                raise DataError(f"{where}: field '{name}' must be a string or a non-empty list of strings, "
                                f"got {type(row[name]).__name__}")
            for j, v in enumerate(value):
                if not isinstance(v, str):
                    raise DataError(f"{where}: field '{name}[{j}]' must be a string, got {type(v).__name__}")
                if not v.strip():
                    raise DataError(f"{where}: field '{name}[{j}]' is empty")
        else:
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
            if kind == "text" and not value.strip():
                raise DataError(f"{where}: field '{name}' is empty")
        out[name] = value
    return out


def read_text(path: str) -> str:
    """A whole UTF-8 text file; bytes that are not UTF-8 are named by file and line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, split at newlines only (\r\n too, not Unicode separators)."""
    return [line.rstrip("\n") for line in io.StringIO(read_text(path), newline=None)]


def _jsonl_records(path: str, on_error=None):
    """(where, record) for each non-blank line, errors naming file and line: raised, or passed to
    ``on_error`` and the line skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                error = DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1})")
            else:
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                    continue
                except json.JSONDecodeError as e:
                    error = DataError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})")
            if on_error is None:
                raise error
            on_error(error)


def _datasets_records(source: str, split: str):
    import datasets

    if os.path.exists(source):
        kind = "parquet" if source.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=source, split="train")
    else:
        ds = datasets.load_dataset(source, split=split)
    for i, r in enumerate(ds):
        yield f"{source}: record {i + 1}", r


def records(source: str, split: str = "train", on_error=None):
    """(where, raw record) of a .jsonl file (read here), or of a .json/.parquet file or hub dataset
    (through ``datasets``): the one reader behind every data file, validated or not.  ``on_error``:
    see _jsonl_records."""
    if source.endswith(".jsonl"):
        if not os.path.exists(source):
            raise DataError(f"{source}: no such file")
        return _jsonl_records(source, on_error)
    return _datasets_records(source, split)


def load_rows(source: str, stage: int, split: str = "train") -> list[dict]:
    """Validated rows of a stage-1 or stage-2 file (or hub dataset name)."""
    fields = {1: STAGE1_FIELDS, 2: STAGE2_FIELDS}[stage]
    rows = [check_row(obj, fields, where) for where, obj in records(source, split)]
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def write_jsonl(path: str, rows: list[dict]):
    """Rows as JSON lines, written atomically (a converted or mined file is never half there)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def row_key(row: dict) -> bytes:
    """16-byte content hash of a stage-2 row: reference scores are keyed by this, not by position."""
    canon = json.dumps([row["query"], row["pos"], list(row["neg"]), row["instruction"]], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).digest()[:16]


@dataclass(frozen=True)
class StepSampler:
    """Which rows each rank reads at each optimizer step, as a pure function of (seed, step).

    Rows are drawn from an endless stream of per-epoch permutations, so resuming at step
    s reproduces the uninterrupted data order exactly with no loader state to save.
    """

    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro_step * self.world_size + rank) * self.micro_batch_size
        out = []
        for pos in range(start, start + self.micro_batch_size):
            epoch, i = divmod(pos, self.num_rows)
            out.append(int(self._perm(epoch)[i]))
        return out
