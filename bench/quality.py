"""AutoRegEmbed vs its baselines on a real LLM (SmolLM2-135M-Instruct), STS-B dev, on CPU.

Protocol: settings are chosen on a tuning split and the report split is scored only for the final
settings.  STS-B dev is split by a fixed seeded permutation into two halves: ``--split tune`` scores
half A (every finished run is appended to bench/results/quality_tuning.jsonl),
``--split report`` scores half B and writes bench/results/quality.{json,png} (at the default settings
only: one canonical table).  Each arm runs for every seed of ``--seeds`` (its own stage 1 too) and is
reported as mean ± standard deviation.  Every run keeps its record, rewritten after each scored arm, in
bench/results/quality_runs/ (a run cut short keeps what it measured), and runs only the points (an arm
at a seed) no record of the same package code and settings holds, then publishes them all as one
table (``--fresh``: every point again); so a table grows over sessions, and the command that built it
prints it again without training.  ``--merge`` publishes the records named.

    python bench/quality.py --split tune --arms cd --seeds 42             # try a setting on half A
    python bench/quality.py --split report --arms abcde                   # the table, ~5 h a seed at one thread
    python bench/quality.py --split report --arms abcde --jobs 2          # a process per point, 2 side by side
    python bench/quality.py --split report --stage1-corpus general+stsb   # the STS-B-text ablation
    python bench/quality.py --split report --arms cd --stage1-corpus general+ir  # stage 1 on the collections' documents
    python bench/quality.py --split tune --arms c --stage1-entailment     # stage 1 beyond autoencoding
    python bench/quality.py --merge bench/results/quality_runs/report-*.json  # seeds run apart, one table

Arms (same base model, same instruction, same pooling unless stated):
  (a) base model: mean of the k EMBED hidden states; and last-token PromptEOL (training-free floor)
  (b) contrastive fine-tune: the trainer's stage 2 with loss.kind=infonce (in-batch + hard negatives,
      tau=0.05), full fine-tune from the base, on the NLI triplets (d) trains on, as many triplets per step
      as stage 2, for as many optimizer steps as (d) takes in total, 10 warm-up steps, (d)'s pooling
  (c) AutoRegEmbed stage 1 only (``--stage1-corpus``: NLI sentences by default, no STS-B text)
  (d) AutoRegEmbed stage 1 + stage 2 (NLI triplets, reference scores from (c); LoRA adapters)
  (e) (d) with in-batch negatives: every other row's positive and negative are negatives too,
      reference scores online (the stage-2 model with its adapters disabled)
  (f) (d) as the authors train it: full fine-tune (no LoRA) at ``--full-ft-lr``
  (g) (b) after an unsupervised phase on stage 1's raw text (``--stage1-corpus``): InfoNCE on two
      independent crops of a text (quality_data.crop_pairs_file), stage 1's steps at (b)'s rate and
      batch, then (b)'s recipe from that model; the contrastive counterpart of (c)->(d), so that
      ``--arms bdg --stage1-corpus general+ir`` asks what in-domain raw text gives each method
Stages (c)-(f) run through the trainer users run (DeepSpeed, one process), with the trainer's
default stage-1 initialisation (decoder_scale.py) unless --no-decoder-scale, and with the decoder
reading its BOS before the compressed tokens (model.decoder_bos) unless --no-decoder-bos.  (b) and
(d)-(f) train with the evaluation's instruction in place of the NLI rows' own unless
--row-instructions, and stage 2 holds c_p = log p(pos|e_pos) as a target (loss.detach_positive)
unless --no-detach-positive; ``--stage2-negatives mined`` gives (d)-(f) negatives mined by (c)'s model
among the rows' own texts (a lever for the margin over (b)).  Stage 1 runs 150 steps at lr 3e-4 with
the in-batch contrast (weight 4) and a shared prefix of 5 vectors by default (lr, contrast and prefix
chosen on the tuning half; 150 steps for an information gap above 1 nat/token on every seed:
docs/experiments.md);
``--stage1-steps 50 --stage1-lr 1e-4 --stage1-contrast 0 --stage1-shared-prefix 0`` is the first protocol's.
The embeddings of (c)-(f) average e_1..e_4 (``--pooling``, the trainer's eval.pooling; chosen on the
tuning half, docs/experiments.md); records made before the option averaged all five.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import quality_retrieval  # bench/quality_retrieval.py, beside this script
from harness import ROOT, commit, data_digest, package_code_digest  # bench/harness.py, beside this script
from quality_data import AUTOENCODE, INSTRUCTION, K, crop_pairs_file, dev_halves, stage1_file, stage2_file
from quality_jobs import fresh_scratch, plan_jobs, points_left, run_apart
from quality_record import ARM_NAMES, comparable, kept_records, measured, merge_records, model_name, publish, run_record
from quality_stage_cache import cached_stage, cached_stage1, run_stage

from autoregembed.ground import distributed as D
from autoregembed.ground.atomic import atomic_write_text
from autoregembed.ground.errors import reporting_user_errors
from autoregembed.run.config import load_config
from autoregembed.release.encoder import Encoder
from autoregembed.release.evaluate import read_sts, sts_eval
from autoregembed.release.meta import ExportMeta


def _meta(stage: str) -> ExportMeta:
    """autoregembed.json for the exports this benchmark writes outside the trainer."""
    return ExportMeta(num_embed_tokens=K, instruction=INSTRUCTION, max_text_len=64, stage=stage)


class PromptEOL:
    """Last-token hidden state of 'This sentence : "<text>" means in one word:"' (Jiang et al. 2023);
    the text cut to ``max_text_len`` tokens when set (retrieval's documents), the prompt kept whole."""

    def __init__(self, path):
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        self.max_text_len = None

    def _cut(self, text: str) -> str:
        if self.max_text_len is None:
            return text
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_len else self.tok.decode(ids[: self.max_text_len])

    @torch.no_grad()
    def encode(self, sentences, batch_size=64, **kw):
        out = []
        for i in range(0, len(sentences), batch_size):
            prompts = [f'This sentence : "{self._cut(s)}" means in one word:"' for s in sentences[i : i + batch_size]]
            b = self.tok(prompts, return_tensors="pt", padding=True)
            out.append(F.normalize(self.model(**b).last_hidden_state[:, -1], dim=-1))
        return torch.cat(out).numpy()

    encode_query = encode_document = encode  # one prompt for both sides: it has no instructions


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (bench/learning_curve.py reads the settings a run of its own would record)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # --jobs rewrites the command line by option names
    ap.add_argument("--split", choices=("tune", "report"), default="tune",
                    help="tune: score STS-B dev half A and log the run; report: score half B, write the results")
    ap.add_argument("--seeds", default="42,1,2", help="comma-separated; every arm runs once per seed")
    ap.add_argument("--arms", default="abcdef", help="which arms to run (letters above)")
    ap.add_argument("--stage1-corpus", choices=("general", "general+stsb", "general+ir"), default="general",
                    help="general+ir: stage 1 also autoencodes the split's retrieval documents (domain adaptation)")
    ap.add_argument("--stage1-entailment", action="store_true", help="mix premise -> entailed hypothesis rows into stage 1")
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16,
                    help="stage-1 rows per step; stage 2 and (b) take half as many triplets")
    ap.add_argument("--nli-rows", type=int, default=240, help="NLI triplets (b) and (d)-(f) train on")
    ap.add_argument("--row-instructions", action="store_true",
                    help="(b) and (d)-(f) train with the NLI rows' own instruction, not the evaluation's")
    ap.add_argument("--stage1-instruction", default=AUTOENCODE, help="the autoencoding rows' instruction")
    ap.add_argument("--stage1-lr", type=float, default=3e-4)
    ap.add_argument("--stage1-contrast", type=float, default=4.0,
                    help="stage1_loss.contrast: weight of the in-batch contrast in stage 1 (0: the authors' loss)")
    ap.add_argument("--stage1-schedule", choices=("linear", "cosine", "constant"), default="linear",
                    help="stage1.lr_schedule after the warm-up")
    ap.add_argument("--stage1-lora-rank", type=int, default=0, help="LoRA rank of stage 1 (0: full fine-tune)")
    ap.add_argument("--stage1-shared-prefix", type=int, default=5,
                    help="model.shared_prefix: learned vectors the decoder reads between e and the target (0: none)")
    ap.add_argument("--stage1-shared-prefix-steps", type=int, default=100, help="model.shared_prefix_steps")
    ap.add_argument("--pooling", default="all_but_last",
                    help="eval.pooling of (c)-(f): the compressed tokens their embedding averages (all: as published)")
    ap.add_argument("--ir-max-len", type=int, default=256,
                    help="tokens of each query and document every arm reads in retrieval (quality_retrieval.py)")
    ap.add_argument("--no-retrieval", action="store_true", help="score STS only (retrieval adds ~4 min an arm)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="model.dtype of the trained arms (bf16: DeepSpeed's bf16 with fp32 master weights)")
    ap.add_argument("--stage2-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lora-rank", type=int, default=16, help="LoRA rank of (d) and (e)")
    ap.add_argument("--stage2-negatives", choices=("nli", "mined"), default="nli",
                    help="(d)-(f)'s negatives: each NLI row's own, or --mined-negatives mined by (c)'s model among "
                         "the rows' positives and negatives (autoregembed mine; no text beyond the rows)")
    ap.add_argument("--mined-negatives", type=int, default=3, help="negatives a row with --stage2-negatives mined")
    ap.add_argument("--full-ft-lr", type=float, default=1e-5, help="(f): the authors' stage-2 learning rate")
    ap.add_argument("--contrastive-lr", type=float, default=5e-5)
    ap.add_argument("--no-decoder-scale", action="store_true",
                    help="stage 1 without the final-norm rescale (model.match_decoder_scale=false: the authors' setup)")
    ap.add_argument("--no-decoder-bos", action="store_true",
                    help="the decoder reads [e_1..e_k ; target] as published (model.decoder_bos=false)")
    ap.add_argument("--no-detach-positive", action="store_true",
                    help="stage 2 back-propagates through c_p = log p(pos|e_pos) as published")
    ap.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero2.json"), type=os.path.abspath,
                    help="DeepSpeed config for (c)-(f); on one process ZeRO-2 and ZeRO-3 give the same losses")
    ap.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct, bench/harness.py)")
    ap.add_argument("--merge", nargs="+", metavar="RECORD",
                    help="combine the records of runs on other seeds (same settings) and publish; trains nothing")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--stage1-cache", default=os.path.join(ROOT, "runs", "stage1-cache"),
                    help="trained stages kept by their key (quality_stage_cache.py): stage 1 by what decides it, so "
                         "--split report reuses the tuning run's, the others by their whole config, so a point run "
                         "again finds its models; a stage killed mid-way resumes there; '' turns it off")
    ap.add_argument("--jobs", type=int, default=1,
                    help="arms and seeds run side by side, a process each with cores/jobs threads; one merged table")
    ap.add_argument("--fresh", action="store_true",
                    help="run every asked point again, not only those no record of this code and settings holds")
    ap.add_argument("--job-of-jobs", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: its parent publishes
    return ap


def records_for(options: list[str], results: str, code: str, data: str | None) -> list[str]:
    """The records in ``results`` a run of this script with ``options`` would pool with (``kept_records``:
    package code ``code``, data ``data``, settings but for seeds and arms): what a series of tables
    (learning_curve.py, domain_adaptation.py) reads back."""
    q = parser().parse_args(options)
    return kept_records(results, q.split, model_name(q, q.base), vars(q), code, data)


def is_canonical(settings: dict) -> bool:
    """Whether ``settings`` are the benchmark's defaults: only such a table is bench/results/quality.json."""
    return comparable(settings) == comparable(vars(parser().parse_args(["--split", "report"])))


def main():
    args = parser().parse_args()
    if args.merge:
        merged = merge_records(args.merge)
        return publish(merged, args.results, canonical=is_canonical(merged["settings"]))
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.jobs < 1:
        sys.exit(f"--jobs must be >= 1, got {args.jobs}")
    unknown = sorted(set(args.arms) - set(ARM_NAMES))
    if unknown:
        sys.exit(f"--arms {args.arms}: no arm {', '.join(unknown)} (arms: {''.join(ARM_NAMES)})")
    try:  # the chart is drawn at the very end, BM25 scores the first arm: fail now, not after hours of work
        import bm25s  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench/quality.py needs {e.name} (and gguf for the one-off model conversion): "
                 f"pip install -e '.[bench]'")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    from harness import smollm2_dir

    base = args.base or smollm2_dir()  # converted here once, not by each --jobs child
    commit_id, code = commit(), package_code_digest()  # the code this process runs: HEAD may move while it does
    data = data_digest()
    kept = [] if args.fresh or args.job_of_jobs else kept_records(args.results, args.split, model_name(args, base),
                                                                   vars(args), code, data)
    plan = points_left(args.arms, seeds, measured(kept, retrieval=not args.no_retrieval))
    if kept:
        left = "; ".join(f"({letters}) seed {seed}" for seed, letters in plan.items()) or "nothing"
        print(f"[quality] {len(kept)} record(s) of this code and these settings in {args.results}/quality_runs; "
              f"left to run: {left}", flush=True)
    if not plan:
        return publish(merge_records(kept), args.results, canonical=is_canonical(vars(args)))
    jobs = plan_jobs(plan, sys.argv[1:], args.out) if args.jobs > 1 else []
    if len(jobs) > 1:
        scratch = fresh_scratch(args.out)
        records = run_apart(jobs, args.jobs, args.results, args.split)
        publish(merge_records(kept + records), args.results, canonical=is_canonical(vars(args)))
        return scratch.release()
    scratch = fresh_scratch(args.out)  # held until the process exits
    args.arms = "".join(dict.fromkeys("".join(plan.values())))  # the record states what this run measured
    args.seeds = ",".join(str(seed) for seed in plan if seed is not None)
    os.makedirs(os.path.join(args.results, "quality_runs"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record_path = os.path.join(args.results, "quality_runs", f"{args.split}-{stamp}-{os.getpid()}.json")
    sts = dev_halves(args.out)[args.split]
    read_sts(sts)
    adapts = args.stage1_corpus == "general+ir"  # stage 1 also reads the split's collections, as scored
    collections = quality_retrieval.collections(args.split) if adapts or not args.no_retrieval else {}
    documents = [t for d in collections.values() for t in d.corpus.values()] if adapts else []
    s1 = stage1_file(os.path.join(args.out, "stage1.jsonl"), args.stage1_corpus, args.stage1_entailment,
                     args.stage1_instruction, documents=documents)
    s2 = stage2_file(os.path.join(args.out, "stage2.jsonl"), args.nli_rows,
                     None if args.row_instructions else INSTRUCTION)
    ir_sets = {} if args.no_retrieval else collections
    scores = {}  # arm name -> {seed: sts_eval dict, with "retrieval": {collection: metrics} when ir_sets}
    timings = {}
    D.init_distributed()

    def timed(name, fn):
        t0 = time.time()
        value = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"[quality] {name}: {value if not isinstance(value, tuple) else value[0]} ({timings[name]} s)", flush=True)
        return value

    def write_record():
        record = run_record(args, base, commit_id, scores, timings, first_last, gaps, code, stage1_cache, data)
        atomic_write_text(record_path, json.dumps(record, indent=2))

    def scored(arm, seed, encoder_fn):  # the arm's losses are in first_last before this writes the record
        encoder = encoder_fn()
        r = timed(f"eval {arm} seed {seed}", lambda: sts_eval(encoder, sts, show_progress_bar=False))
        scores.setdefault(arm, {})[seed] = r
        write_record()  # STS kept before retrieval's ~15 min (a run stopped there keeps it)
        if ir_sets:
            r["retrieval"] = timed(f"retrieval {arm} seed {seed}",
                                   lambda: quality_retrieval.score(encoder, ir_sets, args.ir_max_len))
            write_record()

    common = overrides(args, base, s1, s2, sts)
    ds, cache = args.deepspeed, args.stage1_cache
    contrastive_steps = args.stage1_steps + args.stage2_steps  # as many as (d) takes in total
    first_last, gaps, stage1_cache = {}, {}, {}
    if None in plan:  # arm (a), training-free: no seed
        # the trainer's floor (eval.compare_base), with every EMBED state averaged as published
        scored(ARM_NAMES["a"][0], None, lambda: Encoder.untrained(base, _meta("base"), dtype=torch.float32))
        scored(ARM_NAMES["a"][1], None, lambda: PromptEOL(base))
        if ir_sets:
            scores[ARM_NAMES["a"][2]] = {None: {"retrieval": timed("retrieval BM25", lambda: {
                n: {k: round(v, 4) for k, v in quality_retrieval.bm25(d).items() if k in quality_retrieval.KEPT}
                for n, d in ir_sets.items()})}}
    for seed, arms in plan.items():
        if seed is None:
            continue
        out = os.path.join(args.out, f"seed{seed}")
        own = common + [f"seed={seed}", f"output_dir={out}", f"model.lora_rank={args.stage1_lora_rank}"]
        cfg = load_config(None, own)
        after = [f"seed={seed}", f"paths.stage1_model={cfg.layout.stage1_model}",
                 f"paths.reference_scores={cfg.layout.reference_scores}"]  # stage-2 arms read (c)'s model
        lora = f"model.lora_rank={args.stage2_lora_rank}"
        stage2_arms = {  # arm -> extra overrides, on (c)'s stage-1 model
            "d": [lora, f"output_dir={out}"],
            # 8 queries x 15 candidates in each decoder pass: without checkpointing its activations
            # (~13 GB here) got the process OOM-killed on the 24 GB machine
            "e": [lora, "reference.source=online", "data.in_batch_negatives=true", "model.gradient_checkpointing=true",
                  f"output_dir={out}-inbatch"],
            "f": ["model.lora_rank=0", f"stage2.learning_rate={args.full_ft_lr}", f"output_dir={out}-fullft"],
        }
        def contrastive(start: str, out_dir: str, steps: int, *extra: str):
            """The product's objective (loss.kind=infonce) trained by stage 2 from ``start``, full fine-tune."""
            return load_config(None, [o for o in common if not o.startswith("loss.detach_positive=")] + [
                f"seed={seed}", f"output_dir={out_dir}", f"paths.stage1_model={start}", "loss.kind=infonce",
                "model.lora_rank=0", f"stage2.max_steps={steps}", f"stage2.learning_rate={args.contrastive_lr}",
                "stage2.warmup_steps=10", *extra])

        b_starts = {"b": base}
        if "g" in arms:  # (g)'s unsupervised phase: its start for (b)'s recipe
            crops = crop_pairs_file(os.path.join(args.out, f"crops-seed{seed}.jsonl"), s1,
                                    args.stage1_steps * (args.batch // 2), seed)
            cfg_u = contrastive(base, f"{out}-crops", args.stage1_steps, f"data.stage2={crops}")
            b_starts["g"] = timed(f"train (g) unsupervised seed {seed}", lambda: cached_stage(cfg_u, "stage2", ds, cache)[0])
            first_last[f"(g) unsupervised seed {seed}"] = _first_last(cfg_u, "stage2")
        for letter, start in b_starts.items():
            if letter in arms:
                cfg_b = contrastive(start, f"{out}-infonce" + ("-crops" if letter == "g" else ""), contrastive_steps)
                b_dir = timed(f"train ({letter}) seed {seed}", lambda: cached_stage(cfg_b, "stage2", ds, cache)[0])
                first_last[f"({letter}) seed {seed}"] = _first_last(cfg_b, "stage2")
                scored(ARM_NAMES[letter][0], seed, lambda: Encoder.from_pretrained(b_dir))
        if set(arms) & set("cdef"):
            stage1_dir, entry = timed(f"train (c) seed {seed}", lambda: cached_stage1(cfg, ds, base, cache))
            stage1_cache[f"stage1 seed {seed}"] = entry and os.path.relpath(entry, ROOT)
            first_last[f"stage1 seed {seed}"] = _first_last(cfg, "stage1")
            gaps[f"stage1 seed {seed}"] = _last_gap(cfg)
            print(f"[quality] stage1 seed {seed}: information gap {gaps[f'stage1 seed {seed}']}", flush=True)
            if "c" in arms:  # (d)-(f) alone do not score it again (retrieval: ~15 min an arm)
                # --pooling, not the export's own: a stage 1 from the cache was exported under its first run's
                scored(ARM_NAMES["c"][0], seed, lambda: Encoder.from_pretrained(stage1_dir, pooling=args.pooling))
            if args.stage2_negatives == "mined" and set(arms) & set("def"):  # (d)-(f)'s rows and references
                rows = os.path.join(out, "stage2-mined.jsonl")
                timed(f"mine negatives seed {seed}", lambda: mined_rows(stage1_dir, s2, rows, args, seed))
                cfg = load_config(None, own + [f"data.stage2={rows}"])
                after.append(f"data.stage2={rows}")
        if set(arms) & set("df"):
            timed(f"reference scores seed {seed}", lambda: run_stage(cfg, "reference", ds))
        for letter, extra in stage2_arms.items():
            if letter in arms:
                cfg2 = load_config(None, common + after + extra)
                model_dir = timed(f"train ({letter}) seed {seed}", lambda: cached_stage(cfg2, "stage2", ds, cache)[0])
                first_last[f"({letter}) stage 2 seed {seed}"] = _first_last(cfg2, "stage2")
                scored(ARM_NAMES[letter][0], seed, lambda: Encoder.from_pretrained(model_dir, pooling=args.pooling))
    D.shutdown()
    write_record()  # with BM25's scores, which no scored arm wrote

    if not args.job_of_jobs:
        publish(merge_records(kept + [record_path]), args.results, canonical=is_canonical(vars(args)))
    scratch.release()


def mined_rows(model_dir: str, rows_path: str, out: str, args, seed: int) -> int:
    """Stage-2 rows of ``rows_path`` with ``args.mined_negatives`` negatives each, the passages of the rows'
    positives and negatives closest to the query under ``model_dir`` (the product's miner, its defaults:
    the positive itself and near-copies of it skipped), written to ``out``; returns how many rows."""
    from autoregembed.ground.data import write_jsonl
    from autoregembed.release.mining import default_corpus, mine_negatives, read_queries

    rows = read_queries(rows_path, with_negatives=True)
    encoder = Encoder.from_pretrained(model_dir, pooling=args.pooling)
    mined = mine_negatives(encoder, rows, default_corpus(rows), args.mined_negatives, seed=seed)
    if len(mined) != len(rows):
        sys.exit(f"{rows_path}: {len(rows) - len(mined)} row(s) got no mined negative; (d) would train on fewer rows")
    write_jsonl(out, mined)
    return len(mined)


def overrides(args, base: str, s1: str, s2: str, sts: str) -> list[str]:
    """The trainer's config keys every trained arm shares (the benchmark's fixed protocol + its flags)."""
    common = [f"model.base={base}", f"model.num_embed_tokens={K}", f"model.dtype={args.dtype}",
              "model.gradient_checkpointing=false", f"data.stage1={s1}", f"data.stage2={s2}",
              f"eval.sts_file={sts}", f"eval.instruction={INSTRUCTION}", "data.max_text_len=64",
              "data.max_target_len=64", "stage1.log_every=10", "stage2.log_every=10",
              # a stage killed with its session resumes in the next (quality_stage_cache.py): minutes lost, not the stage
              "stage1.save_every=25", "stage1.keep_last=1", "stage2.save_every=25", "stage2.keep_last=1",
              f"model.match_decoder_scale={not args.no_decoder_scale}", f"model.decoder_bos={not args.no_decoder_bos}",
              f"loss.detach_positive={not args.no_detach_positive}", f"stage1_loss.contrast={args.stage1_contrast}",
              f"stage1.lr_schedule={args.stage1_schedule}", f"model.shared_prefix={args.stage1_shared_prefix}",
              f"model.shared_prefix_steps={args.stage1_shared_prefix_steps}", f"eval.pooling={args.pooling}"]
    for stage, steps, batch, lr in (("stage1", args.stage1_steps, args.batch, args.stage1_lr),
                                    ("stage2", args.stage2_steps, args.batch // 2, args.stage2_lr)):
        common += [f"{stage}.max_steps={steps}", f"{stage}.micro_batch_size={batch}",
                   f"{stage}.learning_rate={lr}", f"{stage}.warmup_steps={max(1, steps // 5)}"]
    return common


def _first_last(cfg, stage: str, n: int = 5) -> list[float]:
    """Mean loss of a stage's first and last ``n`` steps (from its metrics.jsonl)."""
    with open(os.path.join(cfg.layout.stage_dir(stage), "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    first, last = losses[:n], losses[-n:]
    return [round(sum(first) / len(first), 4), round(sum(last) / len(last), 4)]


def _last_gap(cfg) -> dict:
    """Stage 1's information gap at its last logged step (diagnostics.py), from its metrics.jsonl."""
    with open(os.path.join(cfg.layout.stage_dir("stage1"), "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "info_gap" in r][-1]
    return {"step": last["step"], "nats_per_token": round(last["info_gap"], 4),
            "nats_per_text": round(last["info_gap_text"], 3), "loss_shared": round(last["loss_shared"], 4)}



if __name__ == "__main__":
    sys.exit(reporting_user_errors(main, "quality.py"))
