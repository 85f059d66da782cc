"""``autoregembed data convert --from FORMAT SRC OUT``: public training layouts -> our row formats.

- ``simcse-csv``: SimCSE's NLI CSV (header sent0, sent1, hard_neg) -> stage-2 rows.
- ``flagembedding``: FlagEmbedding's jsonl {query, pos: [...], neg: [...], prompt?} -> stage-2
  rows, one per positive, each with all of the query's negatives.
- ``authors``: the AutoRegEmbed release's jsonl {query, pos: str|list, neg: str|list,
  instruction?} -> stage-2 rows; as the authors' code reads it, only the first positive is kept.
- ``text``: one text per line -> stage-1 autoencoding rows {context = output = line}.

Rows without an instruction get ``--instruction`` (SimCSE NLI and plain text have defaults; FlagEmbedding and
the authors' layout, which may hold any task, do not: a row without one is refused).  Every written row passes the stage's own
validation (data.load_rows); the output is written atomically.
"""
from __future__ import annotations

import csv

from ..ground.data import STAGE1_FIELDS, STAGE2_FIELDS, DataError, check_row, read_lines, read_text, records, write_jsonl

STAGE1_INSTRUCTION = "Reconstruct the original text."
STAGE2_INSTRUCTION = "Given a premise, retrieve a hypothesis that entails the premise."


def _texts(value, where: str, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: field '{name}' must be a string or a non-empty list of strings")
    return values


def _field(rec, name: str, where: str):
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if rec.get(name) is None:
        raise DataError(f"{where}: missing field '{name}'")
    return rec[name]


def from_simcse_csv(path: str, instruction: str) -> list[dict]:
    reader = csv.reader(read_text(path).splitlines())
    header = next(reader, None)
    need = ("sent0", "sent1", "hard_neg")
    if header is None or any(c not in header for c in need):
        raise DataError(f"{path}:1: expected a header with columns {', '.join(need)}, got {header}")
    col = {c: header.index(c) for c in need}
    rows = []
    for lineno, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) < len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} columns, got {len(fields)}")
        rows.append({"query": fields[col["sent0"]], "pos": fields[col["sent1"]],
                     "neg": [fields[col["hard_neg"]]], "instruction": instruction})
    return rows


def from_flagembedding(path: str, instruction: str) -> list[dict]:
    rows = []
    for where, rec in records(path):
        query = _field(rec, "query", where)
        negs = _texts(_field(rec, "neg", where), where, "neg")
        inst = rec.get("prompt") or instruction
        rows += [{"query": query, "pos": p, "neg": negs, "instruction": inst}
                 for p in _texts(_field(rec, "pos", where), where, "pos")]
    return rows


def from_authors(path: str, instruction: str) -> list[dict]:
    rows = []
    for where, rec in records(path):
        rows.append({"query": _field(rec, "query", where), "pos": _texts(_field(rec, "pos", where), where, "pos")[0],
                     "neg": _texts(_field(rec, "neg", where), where, "neg"),
                     "instruction": rec.get("instruction") or instruction})
    return rows


def from_text(path: str, instruction: str) -> list[dict]:
    return [{"context": t, "instruction": instruction, "output": t} for t in read_lines(path) if t.strip()]


CONVERTERS = {  # name -> (reader, stage, default instruction; None: the data may be any task, so none)
    "simcse-csv": (from_simcse_csv, 2, STAGE2_INSTRUCTION),
    "flagembedding": (from_flagembedding, 2, None),
    "authors": (from_authors, 2, None),
    "text": (from_text, 1, STAGE1_INSTRUCTION),
}


def convert(kind: str, src: str, out: str, instruction: str | None = None) -> tuple[int, int]:
    """Write ``src`` (layout ``kind``) as our rows to ``out``; returns (rows written, stage)."""
    reader, stage, default = CONVERTERS[kind]
    rows = reader(src, instruction or default)
    fields = STAGE1_FIELDS if stage == 1 else STAGE2_FIELDS
    for i, row in enumerate(rows, 1):
        if row.get("instruction") is None:  # retrieval data must not be given the NLI instruction silently
            raise DataError(f"{src}: converted row {i} carries no instruction and --from {kind} has no default "
                            f"(its data may be any task); pass --instruction")
        check_row(row, fields, f"{src}: converted row {i}")  # an empty text etc. is refused here, not in training
    if not rows:
        raise DataError(f"{src}: no rows")
    write_jsonl(out, rows)
    return len(rows), stage
