"""``autoregembed data check FILE --stage 1|2``: what a training file holds, before a run reads it.

Every malformed row (file:line and field), duplicates, negatives per row, and token lengths under
the run's tokenizer with the share of each field that ``data.max_text_len`` / ``max_target_len``
cut.  Malformed rows are errors; duplicates are reported, not refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..ground.data import STAGE1_FIELDS, STAGE2_FIELDS, DataError, check_row, source_path, source_records

MAX_LISTED = 20  # errors listed in full; the rest are counted
# the budgets each field's tokens are cut at: encoder inputs at max_text_len, decoder targets at
# max_target_len (a stage-2 positive is both)
BUDGETS = {1: {"context": ("max_text_len",), "output": ("max_target_len",)},
           2: {"query": ("max_text_len",), "pos": ("max_text_len", "max_target_len"), "neg": ("max_target_len",)}}


@dataclass
class Report:
    source: str
    stage: int
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    negatives: list[int] = field(default_factory=list)
    lengths: dict = field(default_factory=dict)  # field -> [token counts]
    budgets: dict = field(default_factory=dict)  # field -> {budget name: tokens}

    def as_dict(self) -> dict:
        out = {"file": self.source, "stage": self.stage, "rows": self.rows, "errors": len(self.errors),
               "duplicates": len(self.duplicates)}
        if self.negatives:
            n = np.asarray(self.negatives)
            out["negatives_per_row"] = {"min": int(n.min()), "median": float(np.median(n)), "max": int(n.max())}
        for name, lens in self.lengths.items():
            a = np.asarray(lens)
            out[f"tokens.{name}"] = {"p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
                                     "p99": int(np.percentile(a, 99)), "max": int(a.max()),
                                     **{f"truncated_at_{b}={n}": round(float((a > n).mean()), 4)
                                        for b, n in self.budgets[name].items()}}
        return out

    def text(self) -> str:
        lines = [f"{self.source}: {self.rows} rows (stage {self.stage}), {len(self.errors)} errors, "
                 f"{len(self.duplicates)} duplicate rows"]
        lines += [f"  error: {e}" for e in self.errors[:MAX_LISTED]]
        if len(self.errors) > MAX_LISTED:
            lines.append(f"  ... and {len(self.errors) - MAX_LISTED} more errors")
        lines += [f"  duplicate: {d}" for d in self.duplicates[:MAX_LISTED]]
        d = self.as_dict()
        if "negatives_per_row" in d:
            n = d["negatives_per_row"]
            lines.append(f"  negatives per row: min {n['min']}, median {n['median']:g}, max {n['max']}")
        for name in self.lengths:
            s = d[f"tokens.{name}"]
            cuts = ", ".join(f"{100 * v:.1f}% cut at {k[len('truncated_at_'):]}"
                             for k, v in s.items() if k.startswith("truncated_at_"))
            lines.append(f"  tokens {name}: p50 {s['p50']}, p90 {s['p90']}, p99 {s['p99']}, max {s['max']}; {cuts}")
        return "\n".join(lines)


def check_file(source, stage: int, tokenizer=None, max_text_len: int = 512, max_target_len: int = 512,
               split: str = "train") -> Report:
    """Read every row of ``source`` (a path, or a config ``SourceConfig`` with its column mapping and
    default instruction); ``tokenizer`` (optional) measures lengths in tokens."""
    fields = {1: STAGE1_FIELDS, 2: STAGE2_FIELDS}[stage]
    report = Report(source_path(source), stage)
    first_seen: dict[str, str] = {}
    budgets = {"max_text_len": max_text_len, "max_target_len": max_target_len}
    texts: dict[str, list[str]] = {name: [] for name in BUDGETS[stage]}
    def unreadable(e: DataError):
        report.rows += 1
        report.errors.append(str(e))

    for where, obj in source_records(source, split, on_error=unreadable):
        report.rows += 1
        try:
            row = check_row(obj, fields, where)
        except DataError as e:
            report.errors.append(str(e))
            continue
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in first_seen:
            report.duplicates.append(f"{where} repeats {first_seen[key]}")
        else:
            first_seen[key] = where
        if stage == 2:
            report.negatives.append(len(row["neg"]))
        for name in texts:
            texts[name].extend(row[name] if isinstance(row[name], list) else [row[name]])
    if report.rows == 0 and not report.errors:
        report.errors.append(f"{source_path(source)}: no rows")
    if tokenizer is not None:
        for name, values in texts.items():
            if values:
                ids = tokenizer(values, add_special_tokens=False)["input_ids"]
                report.lengths[name] = [len(i) for i in ids]
                report.budgets[name] = {b: budgets[b] for b in BUDGETS[stage][name]}
    return report
