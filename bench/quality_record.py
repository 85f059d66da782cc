"""bench/quality.py's records: one run's scores as a record (mean ± std over seeds per arm, STS and
retrieval), records of runs on other seeds merged into one, and the published table and chart.

Why apart: a record is the evidence a claim cites, so how it is summarised, merged (a seed measured
twice must agree) and published is one room, tested without training.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import quality_retrieval  # bench/quality_retrieval.py, beside this script
from harness import ROOT, canonical_code, code_aliases  # bench/harness.py, beside this script
from quality_data import AUTOENCODE

from autoregembed.ground.atomic import atomic_write_text

ARM_NAMES = {"a": ["(a) base, mean of EMBED states", "(a) base, PromptEOL last token", "(a) BM25 (lexical)"],
             "b": ["(b) contrastive (InfoNCE)"], "c": ["(c) stage 1 only"], "d": ["(d) stage 1 + stage 2"],
             "e": ["(e) (d) + in-batch negatives"], "f": ["(f) (d) full fine-tune"],
             "g": ["(g) (b) after InfoNCE on stage 1's text"]}
RETRIEVAL_ONLY = {ARM_NAMES["a"][2]}  # BM25 has no embedding to score on STS


def model_name(args, base: str) -> str:
    return "SmolLM2-135M-Instruct" if args.base is None else os.path.basename(os.path.abspath(base))


def run_record(args, base, commit, scores, timings, first_last, gaps, code: str | None = None,
               stage1_cache: dict | None = None, data: str | None = None) -> dict:
    """The run's record: settings, Spearman x100 per arm (mean, std, per seed), retrieval per arm and
    collection, stage 1's information gap at its last step, timings; ``code``: harness.package_code_digest(),
    ``data``: harness.data_digest();
    ``stage1_cache``: the stage-1 cache entry each seed's model is kept in (relative to the checkout; None
    where it is not kept), for measuring those models again later."""
    ordered = sorted(scores.items(), key=lambda kv: _arm_order(kv[0]))
    sts = [(n, v) for n, v in ordered if "spearman" in next(iter(v.values()))]
    return {"model": model_name(args, base), "date": time.strftime("%Y-%m-%d"), "commit": commit, "package_code": code,
            "data": data,
            "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]), "split": args.split,
            "settings": _settings(vars(args)),
            "spearman_x100": summary({n: {str(s): round(r["spearman"], 2) for s, r in v.items()} for n, v in sts}),
            "mean_pairwise_cosine": {n: {str(s): round(r["mean_cosine"], 4) for s, r in v.items()} for n, v in sts},
            "retrieval": retrieval_summary({n: {str(s): r["retrieval"] for s, r in v.items() if "retrieval" in r}
                                             for n, v in ordered if any("retrieval" in r for r in v.values())}),
            "loss_first_last": first_last, "info_gap": gaps, "stage1_cache": stage1_cache or {}, "seconds": timings}


def retrieval_summary(per_seed: dict) -> dict:
    """arm -> {seed: {collection: {metric: x}}} as metric -> collection -> arm -> {mean, std, per_seed},
    with "mean" the collections' mean per seed where there are several (the report's figure)."""
    out = {}
    for metric in quality_retrieval.KEPT:
        table = {}
        for arm, seeds in per_seed.items():
            for seed, by_collection in seeds.items():
                values = {c: m[metric] for c, m in by_collection.items()}
                if len(values) > 1:
                    values["mean"] = round(sum(values.values()) / len(values), 4)
                for c, x in values.items():
                    table.setdefault(c, {}).setdefault(arm, {})[seed] = x
        out[metric] = {c: summary(arms, digits=4) for c, arms in table.items()}
    return out


def _settings(options: dict) -> dict:
    """The options that decide a run's scores (not where it writes, nor how many processes ran it or
    whether it reused records); the DeepSpeed config named relative to the checkout, so that records
    made in different checkouts of the repository compare equal."""
    # records made before an option existed ran without it
    kept = {"stage1_contrast": 0.0, "stage1_schedule": "linear", "stage1_lora_rank": 0,
            "stage1_shared_prefix": 0, "stage1_shared_prefix_steps": 100,
            "stage1_instruction": AUTOENCODE, "dtype": "fp32", "pooling": "all", "stage2_negatives": "nli",
            "mined_negatives": 3,
            **{k: v for k, v in options.items()
               if k not in ("out", "results", "split", "merge", "stage1_cache", "jobs", "job_of_jobs", "fresh")}}
    ds = kept["deepspeed"]  # absolute as parsed; a record's own is relative to the checkout already
    if os.path.isabs(ds) and ds.startswith(ROOT + os.sep):
        kept["deepspeed"] = os.path.relpath(ds, ROOT)
    return kept


def comparable(settings: dict) -> dict:
    """What two records must share to be pooled: their settings less which seeds and arms they ran."""
    return {k: v for k, v in _settings(settings).items() if k not in ("seeds", "arms")}


def _arm_order(name: str) -> int:
    return [n for names in ARM_NAMES.values() for n in names].index(name)


def summary(per_seed: dict, digits: int = 2) -> dict:
    """arm -> {seed: score} as arm -> {mean, std, per_seed}."""
    return {n: dict(zip(("mean", "std"), (round(x, digits) for x in _mean_std(list(v.values())))), per_seed=v)
            for n, v in per_seed.items()}


def kept_records(results: str, split: str, model: str, settings: dict, code: str, data: str | None) -> list[str]:
    """The records in ``results``/quality_runs that pool with a run of ``settings`` (its options): the same
    split, model, package code, data and settings but for seeds and arms (records made before they
    named their data, 2026-12-07, pool with any: ../shared/data had not changed until then)."""
    want, kept, aliases = comparable(settings), [], code_aliases()
    for path in sorted(glob.glob(os.path.join(results, "quality_runs", f"{split}-*.json"))):
        with open(path) as f:
            r = json.load(f)
        same_run = ((r["split"], r["model"], canonical_code(r.get("package_code"), aliases)) == (split, model, code)
                    and r.get("data") in (None, data))
        if same_run and comparable(r["settings"]) == want:
            kept.append(path)
    return kept


def measured(paths: list[str], retrieval: bool) -> set[tuple[str, str]]:
    """(arm letter, seed) of every point these records hold whole: each of the arm's names with its STS
    (BM25 has none) and, when ``retrieval``, its scores on every collection; arm (a)'s seed is "None".
    A run stopped between an arm's STS and its retrieval has not measured that point."""
    whole = {}  # arm name -> seeds
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        by_collection = r.get("retrieval", {}).get("ndcg@10", {})
        sts = {n: v["per_seed"] for n, v in r["spearman_x100"].items()}
        for name in set(sts) | {n for c in by_collection.values() for n in c}:
            in_ir = [set(c.get(name, {}).get("per_seed", {})) for c in by_collection.values()]
            for seed in set(sts.get(name, {})) | set().union(*in_ir):
                if ((name in RETRIEVAL_ONLY or seed in sts.get(name, {}))
                        and (not retrieval or (in_ir and all(seed in s for s in in_ir)))):
                    whole.setdefault(name, set()).add(seed)
    points = set()
    for letter, names in ARM_NAMES.items():
        needed = [n for n in names if retrieval or n not in RETRIEVAL_ONLY]
        points |= {(letter, seed) for seed in set.intersection(*(whole.get(n, set()) for n in needed))}
    return points


def merge_records(paths: list[str]) -> dict:
    """One record from runs of the same model, split and settings on different seeds (a report run
    split across machines or sessions): the per-seed values are pooled and the means recomputed.
    An arm measured twice for one seed must give the same value (training is seeded and
    deterministic on CPU), else the merge is refused; so are records trained by different package code
    or measured on different data (``package_code``, ``data``; records made before they were kept carry
    none and are not checked): another code's seed can differ by as much as the margins a table reads,
    and pooled it would hide that."""
    records, aliases = [json.load(open(p)) for p in paths], code_aliases()
    for field, what in (("package_code", "trained by different package code"), ("data", "measured on different data")):
        # an aliased code is its earlier one
        value = (lambda v: canonical_code(v, aliases)) if field == "package_code" else (lambda v: v)
        values = {value(r.get(field)) for r in records} - {None}
        if len(values) > 1:
            by_value = {v: [p for p, r in zip(paths, records) if value(r.get(field)) == v] for v in sorted(values)}
            sys.exit(f"records {what}, not merged: " + "; ".join(f"{v}: {', '.join(ps)}" for v, ps in by_value.items()))

    def key(r):
        return r["model"], r["split"], comparable(r["settings"])

    per_seed, cosine, ir = {}, {}, {}
    merged = {"seconds": {}, "loss_first_last": {}, "info_gap": {}, "stage1_cache": {}}
    for path, r in zip(paths, records):
        if key(r) != key(records[0]):
            sys.exit(f"{path}: not the same model, split and settings as {paths[0]}; not merged")
        for n, v in r["spearman_x100"].items():
            for seed, x in v["per_seed"].items():
                if per_seed.get(n, {}).get(seed, x) != x:  # a rerun of a seed must reproduce it
                    sys.exit(f"{path}: {n} seed {seed} is {x}, {per_seed[n][seed]} in an earlier file; not merged")
                per_seed.setdefault(n, {})[seed] = x
                cosine.setdefault(n, {})[seed] = r["mean_pairwise_cosine"][n][seed]
        for metric, by_collection in r.get("retrieval", {}).items():  # records before 2026-12-06 have none
            for c, arms in by_collection.items():
                for n, v in arms.items():
                    ir.setdefault(metric, {}).setdefault(c, {}).setdefault(n, {}).update(v["per_seed"])
        for field in merged:
            merged[field].update(r.get(field, {}))  # no info_gap before 2026-12-04, no stage1_cache before 12-07
    first = records[0]
    seeds = list(dict.fromkeys(s for r in records for s in r["settings"]["seeds"].split(",") if s))
    arms = "".join(sorted(set("".join(r["settings"]["arms"] for r in records))))
    return {**first, **merged, "date": max(r["date"] for r in records), "package_code": canonical_code(first.get("package_code"), aliases),
            "commit": ",".join(dict.fromkeys(r["commit"] for r in records)),
            "command": " && ".join(r["command"] for r in records) + " && python bench/quality.py --merge " + " ".join(paths),
            "settings": {**_settings(first["settings"]), "seeds": ",".join(seeds), "arms": arms},
            "spearman_x100": summary(dict(sorted(per_seed.items(), key=lambda kv: _arm_order(kv[0])))),
            "mean_pairwise_cosine": cosine,
            "retrieval": {metric: {c: summary(dict(sorted(arms.items(), key=lambda kv: _arm_order(kv[0]))), digits=4)
                                   for c, arms in by_collection.items()} for metric, by_collection in ir.items()}}


def publish(record: dict, results: str, canonical: bool = True):
    """Print the table.  Tuning split: append the record to quality_tuning.jsonl (every tried setting
    is kept, with its score).  Report split: write quality.json, quality.md (the README's table) and
    quality.png, only when every one of arms (a)-(e) is in it (the table compares them) and the settings
    are the benchmark's defaults (``canonical``: one table; the records of other settings stay in
    quality_runs/)."""
    table = record["spearman_x100"]
    print(f"\nSTS-B dev half '{record['split']}' ({record['model']}, CPU), Spearman x100, mean ± std over seeds")
    for n, v in table.items():
        per_seed = ", ".join(f"{s}: {x:.2f}" for s, x in v["per_seed"].items())
        print(f"  {n:<34} {v['mean']:6.2f} ± {v['std']:.2f}   ({per_seed})")
    for metric, by_collection in record.get("retrieval", {}).items():
        for c, arms in by_collection.items():
            print(f"\n{c} {metric} ({'mean of the collections' if c == 'mean' else 'retrieval'}), mean ± std over seeds")
            for n, v in arms.items():
                per_seed = ", ".join(f"{s}: {x:.4f}" for s, x in v["per_seed"].items())
                print(f"  {n:<34} {v['mean']:.4f} ± {v['std']:.4f}   ({per_seed})")
    for n, g in record.get("info_gap", {}).items():
        print(f"  {n} information gap at step {g['step']}: {g['nats_per_token']:.3f} nats/token, "
              f"{g['nats_per_text']:.2f} nats/text")
    if record["split"] == "tune":
        with open(os.path.join(results, "quality_tuning.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {results}/quality_tuning.jsonl")
        return
    missing = [a for a in "abcde" if not any(n.startswith(f"({a})") for n in table)]
    if missing:
        print(f"--split report without arm(s) {', '.join(missing)}: results not written (the table compares them); "
              "runs on other seeds or arms can be combined with --merge")
        return
    if not canonical:
        print("--split report at settings other than the defaults: quality.json (the canonical table) not written; "
              f"the records are in {results}/quality_runs")
        return
    atomic_write_text(os.path.join(results, "quality.json"), json.dumps(record, indent=2))
    atomic_write_text(os.path.join(results, "quality.md"), markdown(record))
    st = record["settings"]
    plot(table, f"{record['model']}: {st['stage1_steps']}+{st['stage2_steps']} steps, "
         f"{len(st['seeds'].split(','))} seeds, stage 1 on {st['stage1_corpus']}", os.path.join(results, "quality.png"))
    print(f"wrote {results}/quality.json, quality.md and quality.png; total {sum(record['seconds'].values()) / 60:.1f} min")


def markdown(record: dict) -> str:
    """The table as Markdown (the README's): per arm STS x100 and nDCG@10 per collection and their mean,
    each mean ± std with its number of seeds, in the record's arm order."""
    ndcg = record.get("retrieval", {}).get("ndcg@10", {})
    collections = [c for c in ndcg if c != "mean"] + ["mean"] * ("mean" in ndcg)

    def cell(v, digits):
        if not v:
            return "—"
        n = len(v["per_seed"])
        if list(v["per_seed"]) == ["None"]:
            return f"{v['mean']:.{digits}f} (no training)"
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f} (n={n})"

    names = list(dict.fromkeys([*record["spearman_x100"], *(n for c in ndcg.values() for n in c)]))
    names.sort(key=_arm_order)
    head = ["arm", "STS-B x100", *(f"nDCG@10 {c}" for c in collections)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in names:
        cells = [n, cell(record["spearman_x100"].get(n), 2), *(cell(ndcg[c].get(n), 4) for c in collections)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(table: dict, title: str, path: str):
    """Mean Spearman per arm, the error bar one standard deviation over seeds; an arm run on fewer
    seeds than the others says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(table)[::-1]
    mean, std = [table[n]["mean"] for n in names], [table[n]["std"] for n in names]
    ours = ("(c)", "(d)", "(e)", "(f)")
    ax.barh(names, mean, xerr=std, capsize=3, color=["#dd8452" if n.startswith(ours) else "#4c72b0" for n in names])
    ax.set_xlim(0, max(m + sd for m, sd in zip(mean, std)) + 25)  # room for the value labels
    ax.set_xlabel("STS-B dev (report half) Spearman x100")
    ax.set_title(title, fontsize=9)
    seeds = [list(table[n]["per_seed"]) for n in names]
    most = max(len(s) for s in seeds)
    for i, (m, sd, s) in enumerate(zip(mean, std, seeds)):
        note = "training-free" if s == ["None"] else "" if len(s) == most else f"{len(s)} of {most} seeds"
        ax.text(m + sd + 0.5, i, f"{m:.1f} ± {sd:.1f}" + (f" ({note})" if note else ""), va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
