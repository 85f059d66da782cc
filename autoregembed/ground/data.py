"""Training rows: loading, validation with file/line/field errors, and deterministic batching.

Stage-1 rows: {context, instruction, output}.
Stage-2 rows: {query, pos, neg: str | list[str], instruction, document_instruction?}; ``neg`` is
normalised to a list; the optional ``document_instruction`` is what the positive is encoded with (for
c_p = log p(pos|e_pos)) where documents take another instruction than queries (default: ``instruction``).

Local .jsonl files are parsed here line by line so that a malformed row is reported with
its file and line; .json, .parquet, folders (``save_to_disk`` output, Parquet or JSON shards) and
hub datasets go through ``datasets`` and are reported by record number.

A stage reads one or several sources (config ``SourceConfig``: path, weight, column mapping,
default instruction); ``MixtureSampler`` draws their rows in fixed shares.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import hub
from .atomic import atomic_write_text
from .errors import InputError


class DataError(InputError):
    """A malformed training row; the message names file, line (or record) and field."""


STAGE1_FIELDS = {"context": "text", "instruction": "instruction", "output": "text"}
STAGE2_FIELDS = {"query": "text", "pos": "text", "neg": "texts", "instruction": "instruction",
                 "document_instruction": "instruction?"}  # a kind ending in "?": the field may be absent


def check_row(row, fields: dict, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    out = {}
    for name, kind in fields.items():
        if name not in row or row[name] is None:
            if kind.endswith("?"):
                continue
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


def _folder_records(folder: str, split: str, on_error=None):
    """A ``datasets`` ``save_to_disk`` folder, or a folder of .parquet / .jsonl / .json shards."""
    import datasets

    if any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(folder)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{folder}: no split '{split}' (it has {', '.join(ds)})")
            ds = ds[split]
        for i, r in enumerate(ds):
            yield f"{folder}: record {i + 1}", r
        return
    for ext in ("parquet", "jsonl", "json"):
        shards = sorted(glob.glob(os.path.join(glob.escape(folder), f"*.{ext}")))
        if shards:
            break
    else:
        raise DataError(f"{folder}: a folder with no dataset in it (no save_to_disk files, no .parquet, .jsonl "
                        f"or .json shards)")
    if ext == "jsonl":  # our own reader: errors name file and line
        for shard in shards:
            yield from _jsonl_records(shard, on_error)
        return
    ds = datasets.load_dataset(ext, data_files=shards, split="train")
    for i, r in enumerate(ds):
        yield f"{folder}: record {i + 1}", r


def _datasets_records(source: str, split: str):
    import datasets

    if os.path.exists(source):
        kind = "parquet" if source.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=source, split="train")
    else:
        what = f"{source}: no such file or folder, so it was read as a Hugging Face hub dataset"
        hub.check_repo(source, "dataset", what, DataError)  # one quick request, not datasets' retries
        with hub.answering(what, DataError):
            try:
                ds = datasets.load_dataset(source, split=split)
            except FileNotFoundError as e:  # datasets' DatasetNotFoundError: not in the cache, or no such name
                raise DataError(f"{what}: {hub.reason(e) if hub.offline() else str(e).splitlines()[0][:200]}") from None
    for i, r in enumerate(ds):
        yield f"{source}: record {i + 1}", r


def records(source: str, split: str = "train", on_error=None):
    """(where, raw record) of a .jsonl file (read here), or of a .json/.parquet file or hub dataset
    (through ``datasets``): the one reader behind every data file, validated or not.  ``on_error``:
    see _jsonl_records."""
    if os.path.isdir(source):
        return _folder_records(source, split, on_error)
    if source.endswith(".jsonl"):
        if not os.path.exists(source):
            raise DataError(f"{source}: no such file")
        return _jsonl_records(source, on_error)
    return _datasets_records(source, split)


def source_path(source) -> str:
    return source if isinstance(source, str) else source.path


def source_records(source, split: str = "train", on_error=None):
    """``records`` of a source (a path, or a ``SourceConfig``) with its column mapping (ours <- its
    column) and default instructions applied, so that ``check_row`` sees our field names."""
    columns = {} if isinstance(source, str) else dict(source.columns or {})
    defaults = {} if isinstance(source, str) else {k: v for k, v in (("instruction", source.instruction), (
        "document_instruction", source.document_instruction)) if v is not None}
    for where, rec in records(source_path(source), split, on_error):
        if isinstance(rec, dict) and (columns or defaults):
            original, rec = rec, dict(rec)
            for ours, theirs in columns.items():
                if theirs not in original:
                    raise DataError(f"{where}: missing column '{theirs}' (mapped to '{ours}'; it has "
                                    f"{', '.join(map(str, original))})")
                rec[ours] = original[theirs]
            for name, value in defaults.items():
                if rec.get(name) is None:
                    rec[name] = value
        yield where, rec


def load_rows(source, stage: int, split: str = "train") -> list[dict]:
    """Validated rows of a stage-1 or stage-2 source: a file, folder or hub dataset name, or a
    ``SourceConfig`` (its column mapping and default instruction applied)."""
    fields = {1: STAGE1_FIELDS, 2: STAGE2_FIELDS}[stage]
    rows = [check_row(obj, fields, where) for where, obj in source_records(source, split)]
    if not rows:
        raise DataError(f"{source_path(source)}: no rows")
    return rows


class SourceRows(list):
    """The rows of several sources, one after another; ``sizes``: how many each gave (the sampler's
    shares are per source)."""

    def __init__(self, rows=(), sizes=()):
        super().__init__(rows)
        self.sizes = tuple(sizes) or (len(self),)


def load_sources(sources: list, stage: int) -> SourceRows:
    per_source = [load_rows(s, stage) for s in sources]
    return SourceRows([r for rows in per_source for r in rows], [len(rows) for rows in per_source])


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


@dataclass(frozen=True)
class MixtureSampler:
    """``StepSampler``'s contract (rows per rank and step as a pure function of (seed, step)) over
    several sources given one after another (``sizes``), in fixed shares.

    Each epoch holds n_i rows of source i: its size, or with ``weights`` that share of all the
    rows; each source is read in its own endless stream of permutations, so an epoch's rows are a
    pure function of the epoch.  The epoch is shuffled, or with ``same_source`` cut into
    micro-batches of one source each (in-batch negatives from another task would be false
    negatives) whose order is shuffled; n_i is then rounded up to whole micro-batches.
    """

    sizes: tuple
    weights: tuple | None
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    same_source: bool = False

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def quotas(self) -> tuple:
        total = sum(self.sizes)
        if self.weights is None:
            n = list(self.sizes)
        else:
            n = [max(1, round(w / sum(self.weights) * total)) for w in self.weights]
        if self.same_source:
            mb = self.micro_batch_size
            n = [-(-x // mb) * mb for x in n]
        return tuple(n)

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        size, out = self.sizes[source], []
        for e in range(start // size, (start + count - 1) // size + 1):
            perm = np.random.default_rng([self.seed, source + 1, e]).permutation(size)
            lo, hi = max(start, e * size) - e * size, min(start + count, (e + 1) * size) - e * size
            out.append(perm[lo:hi])
        return np.concatenate(out) + sum(self.sizes[:source])

    @lru_cache(maxsize=4)
    def epoch(self, e: int) -> np.ndarray:
        parts = [self._stream(i, e * n, n) for i, n in enumerate(self.quotas)]
        rng = np.random.default_rng([self.seed, 0, e])
        if not self.same_source:
            return np.concatenate(parts)[rng.permutation(sum(self.quotas))]
        chunks = [p[j : j + self.micro_batch_size] for p in parts for j in range(0, len(p), self.micro_batch_size)]
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro_step * self.world_size + rank) * self.micro_batch_size
        length = sum(self.quotas)
        return [int(self.epoch(pos // length)[pos % length]) for pos in range(start, start + self.micro_batch_size)]


def realised_shares(sampler, steps: int) -> list[float]:
    """Each source's share of the rows ``sampler`` hands out in ``steps`` optimizer steps (every rank
    and micro-batch): whole epochs hold the quotas exactly, so only the last, partial one is counted."""
    if not isinstance(sampler, MixtureSampler):
        return [1.0]
    total, length = steps * sampler.global_batch, sum(sampler.quotas)
    counts = np.array(sampler.quotas) * (total // length)
    bounds = np.cumsum(sampler.sizes)
    partial = sampler.epoch(total // length)[: total % length]
    counts = counts + np.bincount(np.searchsorted(bounds, partial, side="right"), minlength=len(sampler.sizes))
    return (counts / max(total, 1)).tolist()


def sampler_for(sizes: tuple, weights: tuple | None, micro_batch_size: int, grad_accum: int, world_size: int,
                seed: int, same_source: bool = False):
    """The stage's sampler: one source without ``same_source`` keeps ``StepSampler``'s order exactly
    (runs and checkpoints made before mixtures existed resume unchanged)."""
    if len(sizes) == 1 and not same_source:
        return StepSampler(sizes[0], micro_batch_size, grad_accum, world_size, seed)
    return MixtureSampler(tuple(sizes), None if weights is None else tuple(weights), micro_batch_size, grad_accum,
                          world_size, seed, same_source)
