"""AutoRegEmbed vs its baselines on a real LLM (SmolLM2-135M-Instruct), STS-B dev, on CPU.

Protocol: settings are chosen on a tuning split and the report split is scored only for the final
settings.  STS-B dev is split by a fixed seeded permutation into two halves: ``--split tune`` scores
half A (every finished run is appended to bench/results/quality_tuning.jsonl),
``--split report`` scores half B and writes bench/results/quality.{json,png}.  Each arm runs for every
seed of ``--seeds`` (its own stage 1 too) and is reported as mean ± standard deviation.  Every run
keeps its record, rewritten after each scored arm, in bench/results/quality_runs/ (a run cut short
keeps what it measured); ``--merge`` publishes runs made on separate seeds as one table.

    python bench/quality.py --split tune --arms cd --seeds 42             # try a setting on half A
    python bench/quality.py --split report --arms abcde                   # the table, ~2 h a seed on 2 cores
    python bench/quality.py --split report --arms abcde --jobs 3          # its seeds side by side, one table
    python bench/quality.py --split report --stage1-corpus general+stsb   # the STS-B-text ablation
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
Stages (c)-(f) run through the trainer users run (DeepSpeed, one process), with the trainer's
default stage-1 initialisation (decoder_scale.py) unless --no-decoder-scale, and with the decoder
reading its BOS before the compressed tokens (model.decoder_bos) unless --no-decoder-bos.  (b) and
(d)-(f) train with the evaluation's instruction in place of the NLI rows' own unless
--row-instructions, and stage 2 holds c_p = log p(pos|e_pos) as a target (loss.detach_positive)
unless --no-detach-positive.  Stage 1 runs 150 steps at lr 3e-4 with the in-batch contrast (weight 4)
and a shared prefix of 5 vectors by default (lr, contrast and prefix chosen on the tuning half; 150
steps for an information gap above 1 nat/token on every seed: docs/experiments.md);
``--stage1-steps 50 --stage1-lr 1e-4 --stage1-contrast 0 --stage1-shared-prefix 0`` is the first protocol's.
The embeddings of (c)-(f) average e_1..e_4 (``--pooling``, the trainer's eval.pooling; chosen on the
tuning half, docs/experiments.md); records made before the option averaged all five.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import sys
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import quality_retrieval  # bench/quality_retrieval.py, beside this script  # noqa: E402
from harness import ROOT, commit  # bench/harness.py, beside this script  # noqa: E402

from autoregembed.ground import distributed as D  # noqa: E402
from autoregembed.ground.atomic import atomic_dir, atomic_write_text  # noqa: E402
from autoregembed.run.config import load_config  # noqa: E402
from autoregembed.ground.data import load_rows, read_lines, write_jsonl  # noqa: E402
from autoregembed.release.encoder import Encoder  # noqa: E402
from autoregembed.release.evaluate import read_sts, sts_eval  # noqa: E402
from autoregembed.release.meta import ExportMeta  # noqa: E402
from autoregembed.run.runlock import RunLock  # noqa: E402
from autoregembed.run.stages import stages_for  # noqa: E402
from autoregembed.run.session import RunContext  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
AUTOENCODE = "Reconstruct the original text."
INSTRUCTION = "Retrieve semantically similar text."
K = 5


ENTAIL = "Write a sentence that this text implies."


def _nli_rows() -> list[dict]:
    return load_rows(os.path.join(SHARED, "nli", "medi_nli.jsonl"), stage=2)


def stage1_file(path: str, corpus: str, entailment: bool, instruction: str = AUTOENCODE, n_sts: int = 3000) -> str:
    """Stage-1 rows.  ``corpus``: "general" autoencodes the NLI sentences (MNLI/SNLI genres, none
    from STS-B); "general+stsb" adds ``n_sts`` STS-B train sentences, drawn from the genres and
    sources of the dev pairs the table reports (the ablation).  ``entailment`` mixes in rows that
    need the meaning, not the surface: premise -> the hypothesis it entails."""
    nli = _nli_rows()
    sents = [s for r in nli for s in [r["query"], r["pos"], *r["neg"]]]
    if corpus == "general+stsb":
        with open(os.path.join(SHARED, "stsb", "sts-train.csv"), encoding="utf-8") as f:
            sts = [r[c] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7 for c in (5, 6)]
        sents = random.Random(0).sample(sts, n_sts) + sents
    rows = [{"context": t, "instruction": instruction, "output": t} for t in dict.fromkeys(sents)]
    if entailment:
        rows += [{"context": r["query"], "instruction": ENTAIL, "output": r["pos"]} for r in nli]
        random.Random(1).shuffle(rows)
    write_jsonl(path, rows)
    return path


def stage2_file(path: str, n_rows: int, instruction: str | None) -> str:
    """The first ``n_rows`` NLI triplets: what (b) and (d)-(f) train on.  ``instruction`` replaces
    each row's own with the one the evaluation uses (the authors train stage 2 with the prompt they
    evaluate with); None keeps the rows' own."""
    rows = _nli_rows()[:n_rows]
    write_jsonl(path, [{**r, "instruction": instruction or r["instruction"]} for r in rows])
    return path


def dev_halves(out_dir: str) -> dict:
    """STS-B dev split in two by a fixed seeded permutation: {"tune": half A, "report": half B}."""
    lines = [line for line in read_lines(os.path.join(SHARED, "stsb", "sts-dev.csv")) if line.strip()]
    order = random.Random(20261126).sample(range(len(lines)), len(lines))
    half = len(lines) // 2
    out = {}
    for name, idx in (("tune", order[:half]), ("report", order[half:])):
        out[name] = os.path.join(out_dir, f"sts-dev-{name}.csv")
        with open(out[name], "w", encoding="utf-8") as f:
            f.write("".join(lines[i] + "\n" for i in sorted(idx)))
    return out


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


ARM_NAMES = {"a": ["(a) base, mean of EMBED states", "(a) base, PromptEOL last token", "(a) BM25 (lexical)"],
             "b": ["(b) contrastive (InfoNCE)"], "c": ["(c) stage 1 only"], "d": ["(d) stage 1 + stage 2"],
             "e": ["(e) (d) + in-batch negatives"], "f": ["(f) (d) full fine-tune"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # --jobs rewrites the command line by option names
    ap.add_argument("--split", choices=("tune", "report"), default="tune",
                    help="tune: score STS-B dev half A and log the run; report: score half B, write the results")
    ap.add_argument("--seeds", default="42,1,2", help="comma-separated; every arm runs once per seed")
    ap.add_argument("--arms", default="abcdef", help="which arms to run (letters above)")
    ap.add_argument("--stage1-corpus", choices=("general", "general+stsb"), default="general")
    ap.add_argument("--stage1-entailment", action="store_true", help="mix premise -> entailed hypothesis rows into stage 1")
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="stage-1 rows per step; stage 2 and (b) take half as many triplets")
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
    ap.add_argument("--full-ft-lr", type=float, default=1e-5, help="(f): the authors' stage-2 learning rate")
    ap.add_argument("--contrastive-lr", type=float, default=5e-5)
    ap.add_argument("--no-decoder-scale", action="store_true",
                    help="stage 1 without the final-norm rescale (model.match_decoder_scale=false: the authors' setup)")
    ap.add_argument("--no-decoder-bos", action="store_true",
                    help="the decoder reads [e_1..e_k ; target] as published (model.decoder_bos=false)")
    ap.add_argument("--no-detach-positive", action="store_true",
                    help="stage 2 back-propagates through c_p = log p(pos|e_pos) as published")
    ap.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero2.json"),
                    help="DeepSpeed config for (c)-(f); on one process ZeRO-2 and ZeRO-3 give the same losses")
    ap.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct, bench/harness.py)")
    ap.add_argument("--merge", nargs="+", metavar="RECORD",
                    help="combine the records of runs on other seeds (same settings) and publish; trains nothing")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--stage1-cache", default=os.path.join(ROOT, "runs", "stage1-cache"),
                    help="stage-1 results kept by what decides them (settings, seed, data, code), so that "
                         "--split report reuses the tuning run's stage 1; '' turns it off")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run side by side, each in its own process with cores/jobs threads; one merged table")
    ap.add_argument("--job-of-jobs", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: its parent publishes
    args = ap.parse_args()
    if args.merge:
        return publish(merge_records(args.merge), args.results)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.jobs < 1:
        sys.exit(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and len(seeds) > 1:
        scratch = fresh_scratch(args.out)
        publish(merge_records(run_seeds_apart(args, seeds, sys.argv[1:])), args.results)
        return scratch.release()
    try:  # the chart is drawn at the very end, BM25 scores the first arm: fail now, not after hours of work
        import bm25s  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench/quality.py needs {e.name} (and gguf for the one-off model conversion): "
                 f"pip install -e '.[bench]'")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    from harness import smollm2_dir

    base = args.base or smollm2_dir()
    scratch = fresh_scratch(args.out)  # held until the process exits
    commit_id = commit()  # the code this process runs: HEAD may move while it does
    os.makedirs(os.path.join(args.results, "quality_runs"), exist_ok=True)
    record_path = os.path.join(args.results, "quality_runs", f"{args.split}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
    sts = dev_halves(args.out)[args.split]
    read_sts(sts)
    s1 = stage1_file(os.path.join(args.out, "stage1.jsonl"), args.stage1_corpus, args.stage1_entailment,
                     args.stage1_instruction)
    s2 = stage2_file(os.path.join(args.out, "stage2.jsonl"), args.nli_rows,
                     None if args.row_instructions else INSTRUCTION)
    ir_sets = {} if args.no_retrieval else quality_retrieval.collections(args.split)
    scores = {}  # arm name -> {seed: sts_eval dict, with "retrieval": {collection: metrics} when ir_sets}
    timings = {}
    D.init_distributed()

    def timed(name, fn):
        t0 = time.time()
        value = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"[quality] {name}: {value if not isinstance(value, tuple) else value[0]} ({timings[name]} s)", flush=True)
        return value

    def scored(arm, seed, encoder_fn):  # the arm's losses are in first_last before this writes the record
        encoder = encoder_fn()
        r = timed(f"eval {arm} seed {seed}", lambda: sts_eval(encoder, sts, show_progress_bar=False))
        if ir_sets:
            r["retrieval"] = timed(f"retrieval {arm} seed {seed}",
                                   lambda: quality_retrieval.score(encoder, ir_sets, args.ir_max_len))
        scores.setdefault(arm, {})[seed] = r
        atomic_write_text(record_path, json.dumps(_record(args, base, commit_id, scores, timings, first_last, gaps), indent=2))

    common = overrides(args, base, s1, s2, sts)
    ds = args.deepspeed
    contrastive_steps = args.stage1_steps + args.stage2_steps  # as many as (d) takes in total
    first_last, gaps = {}, {}
    if "a" in args.arms:  # training-free: no seed
        # the trainer's floor (eval.compare_base), with every EMBED state averaged as published
        scored(ARM_NAMES["a"][0], None, lambda: Encoder.untrained(base, _meta("base"), dtype=torch.float32))
        scored(ARM_NAMES["a"][1], None, lambda: PromptEOL(base))
        if ir_sets:
            scores[ARM_NAMES["a"][2]] = {None: {"retrieval": timed("retrieval BM25", lambda: {
                n: {k: round(v, 4) for k, v in quality_retrieval.bm25(d).items() if k in quality_retrieval.KEPT}
                for n, d in ir_sets.items()})}}
    for seed in seeds:
        out = os.path.join(args.out, f"seed{seed}")
        cfg = load_config(None, common + [f"seed={seed}", f"output_dir={out}", f"model.lora_rank={args.stage1_lora_rank}"])
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
        if "b" in args.arms:
            # the product's objective (loss.kind=infonce) trained by stage 2 from the base itself
            cfg_b = load_config(None, [o for o in common if not o.startswith("loss.detach_positive=")] + [
                f"seed={seed}", f"output_dir={out}-infonce", f"paths.stage1_model={base}", "loss.kind=infonce",
                "model.lora_rank=0", f"stage2.max_steps={contrastive_steps}",
                f"stage2.learning_rate={args.contrastive_lr}", "stage2.warmup_steps=10"])
            c_dir = timed(f"train (b) seed {seed}", lambda: run_stage(cfg_b, "stage2", ds).artifact)
            first_last[f"(b) seed {seed}"] = _first_last(cfg_b, "stage2")
            scored(ARM_NAMES["b"][0], seed, lambda: Encoder.from_pretrained(c_dir))
        if set(args.arms) & set("cdef"):
            stage1_dir = timed(f"train (c) seed {seed}", lambda: cached_stage1(cfg, ds, base, args.stage1_cache))
            first_last[f"stage1 seed {seed}"] = _first_last(cfg, "stage1")
            gaps[f"stage1 seed {seed}"] = _last_gap(cfg)
            print(f"[quality] stage1 seed {seed}: information gap {gaps[f'stage1 seed {seed}']}", flush=True)
            # --pooling, not the export's own: a stage 1 from the cache was exported under its first run's
            scored(ARM_NAMES["c"][0], seed, lambda: Encoder.from_pretrained(stage1_dir, pooling=args.pooling))
        if set(args.arms) & set("df"):
            timed(f"reference scores seed {seed}", lambda: run_stage(cfg, "reference", ds))
        for letter, extra in stage2_arms.items():
            if letter in args.arms:
                cfg2 = load_config(None, common + after + extra)
                model_dir = timed(f"train ({letter}) seed {seed}", lambda: run_stage(cfg2, "stage2", ds).artifact)
                first_last[f"({letter}) stage 2 seed {seed}"] = _first_last(cfg2, "stage2")
                scored(ARM_NAMES[letter][0], seed, lambda: Encoder.from_pretrained(model_dir, pooling=args.pooling))
    D.shutdown()

    if not args.job_of_jobs:
        publish(_record(args, base, commit_id, scores, timings, first_last, gaps), args.results)
    scratch.release()


def job_argv(argv: list[str], seed: int, arms: str, out: str) -> list[str]:
    """The command line of one ``--jobs`` child: the user's options less --seeds, --arms, --out and
    --jobs (either spelling, ``--opt v`` or ``--opt=v``), then the child's own."""
    drop, kept, skip = {"--seeds", "--jobs", "--out", "--arms"}, [], False
    for a in argv:
        if skip or a.split("=")[0] in drop:
            skip = not skip and "=" not in a
            continue
        kept.append(a)
    return [*kept, "--seeds", str(seed), "--arms", arms, "--out", out, "--job-of-jobs"]


def run_seeds_apart(args, seeds: list[int], argv: list[str]) -> list[str]:
    """``--jobs``: this command once per seed, each in its own process (arm (a), which has no seed, in
    the first only), at most ``args.jobs`` at a time with cores / jobs threads each; returns their records
    for ``merge_records``.  Why: seeds are independent runs, so the report's three need not take three
    times one seed's wall time (docs/benchmarks.md has the cost)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    pending, running, records = list(enumerate(seeds)), [], []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                i, seed = pending.pop(0)
                arms = args.arms if i == 0 else args.arms.replace("a", "")
                out = os.path.join(args.out, f"job-seed{seed}")
                log = open(out + ".log", "w")
                cmd = [sys.executable, os.path.abspath(__file__), *job_argv(argv, seed, arms, out)]
                running.append((seed, log, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                         env=env)))
                print(f"[quality] seed {seed}: {' '.join(cmd[1:])} (log {log.name})", flush=True)
            time.sleep(1)
            for job in [j for j in running if j[-1].poll() is not None]:
                seed, log, started, proc = job
                running.remove(job)
                log.close()
                if proc.returncode:
                    sys.exit(f"[quality] seed {seed} failed (exit {proc.returncode}): see {log.name}")
                found = [p for p in glob.glob(os.path.join(args.results, "quality_runs", f"{args.split}-*-{proc.pid}.json"))
                         if os.path.getmtime(p) >= started - 1]  # not an older run's record under a reused pid
                if not found:
                    sys.exit(f"[quality] seed {seed} wrote no record: see {log.name}")
                records.append(max(found, key=os.path.getmtime))
                print(f"[quality] seed {seed} done: {records[-1]}", flush=True)
    finally:  # a failed seed or an interrupt (Ctrl-C) stops the other seeds too, instead of leaving them running
        for *_, proc in running:
            proc.terminate()
    return records


def overrides(args, base: str, s1: str, s2: str, sts: str) -> list[str]:
    """The trainer's config keys every trained arm shares (the benchmark's fixed protocol + its flags)."""
    common = [f"model.base={base}", f"model.num_embed_tokens={K}", f"model.dtype={args.dtype}",
              "model.gradient_checkpointing=false", f"data.stage1={s1}", f"data.stage2={s2}",
              f"eval.sts_file={sts}", f"eval.instruction={INSTRUCTION}", "data.max_text_len=64",
              "data.max_target_len=64", "stage1.log_every=10", "stage2.log_every=10",
              f"model.match_decoder_scale={not args.no_decoder_scale}", f"model.decoder_bos={not args.no_decoder_bos}",
              f"loss.detach_positive={not args.no_detach_positive}", f"stage1_loss.contrast={args.stage1_contrast}",
              f"stage1.lr_schedule={args.stage1_schedule}", f"model.shared_prefix={args.stage1_shared_prefix}",
              f"model.shared_prefix_steps={args.stage1_shared_prefix_steps}", f"eval.pooling={args.pooling}"]
    for stage, steps, batch, lr in (("stage1", args.stage1_steps, args.batch, args.stage1_lr),
                                    ("stage2", args.stage2_steps, args.batch // 2, args.stage2_lr)):
        common += [f"{stage}.max_steps={steps}", f"{stage}.micro_batch_size={batch}",
                   f"{stage}.learning_rate={lr}", f"{stage}.warmup_steps={max(1, steps // 5)}"]
    return common


def fresh_scratch(out: str) -> RunLock:
    """Empty the benchmark's scratch folder for a fresh run, under its run lock: a second run given the
    same ``--out`` is refused instead of deleting the models the first is training and scoring."""
    lock = RunLock(out).acquire()
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if path == lock.path:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return lock


def _record(args, base, commit, scores, timings, first_last, gaps) -> dict:
    """The run's record: settings, Spearman x100 per arm (mean, std, per seed), retrieval per arm and
    collection, stage 1's information gap at its last step, timings."""
    model_name = "SmolLM2-135M-Instruct" if args.base is None else os.path.basename(os.path.abspath(base))
    ordered = sorted(scores.items(), key=lambda kv: _arm_order(kv[0]))
    sts = [(n, v) for n, v in ordered if "spearman" in next(iter(v.values()))]
    return {"model": model_name, "date": time.strftime("%Y-%m-%d"), "commit": commit,
            "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]), "split": args.split,
            "settings": _settings(vars(args)),
            "spearman_x100": _summary({n: {str(s): round(r["spearman"], 2) for s, r in v.items()} for n, v in sts}),
            "mean_pairwise_cosine": {n: {str(s): round(r["mean_cosine"], 4) for s, r in v.items()} for n, v in sts},
            "retrieval": _retrieval_summary({n: {str(s): r["retrieval"] for s, r in v.items()}
                                             for n, v in ordered if "retrieval" in next(iter(v.values()))}),
            "loss_first_last": first_last, "info_gap": gaps, "seconds": timings}


def _retrieval_summary(per_seed: dict) -> dict:
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
        out[metric] = {c: _summary(arms, digits=4) for c, arms in table.items()}
    return out


def _settings(options: dict) -> dict:
    """The options that decide a run's scores; the DeepSpeed config named relative to the checkout, so
    that records made in different checkouts of the repository compare equal."""
    kept = {"stage1_contrast": 0.0, "stage1_schedule": "linear", "stage1_lora_rank": 0,  # records before the options existed ran without them
            "stage1_shared_prefix": 0, "stage1_shared_prefix_steps": 100,
            "stage1_instruction": AUTOENCODE, "dtype": "fp32", "pooling": "all",
            **{k: v for k, v in options.items() if k not in ("out", "results", "split", "merge", "stage1_cache")}}
    ds = os.path.abspath(kept["deepspeed"])
    if ds.startswith(ROOT + os.sep):
        kept["deepspeed"] = os.path.relpath(ds, ROOT)
    return kept


def _arm_order(name: str) -> int:
    return [n for names in ARM_NAMES.values() for n in names].index(name)


def _summary(per_seed: dict, digits: int = 2) -> dict:
    """arm -> {seed: score} as arm -> {mean, std, per_seed}."""
    return {n: dict(zip(("mean", "std"), (round(x, digits) for x in _mean_std(list(v.values())))), per_seed=v)
            for n, v in per_seed.items()}


def merge_records(paths: list[str]) -> dict:
    """One record from runs of the same model, split and settings on different seeds (a report run
    split across machines or sessions): the per-seed values are pooled and the means recomputed.
    An arm measured twice for one seed must give the same value (training is seeded and
    deterministic on CPU), else the merge is refused."""
    records = [json.load(open(p)) for p in paths]

    def key(r):
        return r["model"], r["split"], {k: v for k, v in _settings(r["settings"]).items() if k not in ("seeds", "arms")}

    per_seed, cosine, ir, merged = {}, {}, {}, {"seconds": {}, "loss_first_last": {}, "info_gap": {}}
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
        for field in ("seconds", "loss_first_last", "info_gap"):
            merged[field].update(r.get(field, {}))  # records before 2026-12-04 have no info_gap
    first = records[0]
    seeds = list(dict.fromkeys(s for r in records for s in r["settings"]["seeds"].split(",")))
    arms = "".join(sorted(set("".join(r["settings"]["arms"] for r in records))))
    return {**first, **merged, "date": max(r["date"] for r in records),
            "commit": ",".join(dict.fromkeys(r["commit"] for r in records)),
            "command": " && ".join(r["command"] for r in records) + " && python bench/quality.py --merge " + " ".join(paths),
            "settings": {**_settings(first["settings"]), "seeds": ",".join(seeds), "arms": arms},
            "spearman_x100": _summary(dict(sorted(per_seed.items(), key=lambda kv: _arm_order(kv[0])))),
            "mean_pairwise_cosine": cosine,
            "retrieval": {metric: {c: _summary(dict(sorted(arms.items(), key=lambda kv: _arm_order(kv[0]))), digits=4)
                                   for c, arms in by_collection.items()} for metric, by_collection in ir.items()}}


def publish(record: dict, results: str):
    """Print the table.  Tuning split: append the record to quality_tuning.jsonl (every tried setting
    is kept, with its score).  Report split: write quality.json and quality.png, only when every one of
    arms (a)-(e) is in it (the table compares them)."""
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
    atomic_write_text(os.path.join(results, "quality.json"), json.dumps(record, indent=2))
    st = record["settings"]
    plot(table, f"{record['model']}: {st['stage1_steps']}+{st['stage2_steps']} steps, "
         f"{len(st['seeds'].split(','))} seeds, stage 1 on {st['stage1_corpus']}", os.path.join(results, "quality.png"))
    print(f"wrote {results}/quality.json and quality.png; total {sum(record['seconds'].values()) / 60:.1f} min")


def run_stage(cfg, name: str, ds: str):
    """One stage of ``cfg`` as the pipeline runs it (without its up-front checks and lock)."""
    return stages_for(cfg)[name].run(RunContext.of(cfg, ds), resume=False)


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


STAGE1_KEPT = ("model", "metrics.jsonl", "shared_prefix.safetensors")  # what the later arms and the record read


def cached_stage1(cfg, ds: str, base: str, cache: str) -> str:
    """Stage 1's exported model: copied from ``cache`` when a run with the same key finished it, else
    trained and kept there.  Stage 1 is bit-exact for a given key on one machine and reads no STS-B
    half, so the report split's stage 1 is the tuning split's; the key is every stage-1 setting, the
    seed, the stage-1 rows, the package's code, the DeepSpeed config and the base model's files."""
    if not cache:
        return run_stage(cfg, "stage1", ds).artifact
    entry = os.path.join(cache, stage1_key(cfg, ds, base))
    stage_dir = cfg.layout.stage_dir("stage1")
    if os.path.isdir(entry):
        print(f"[quality] stage 1 from the cache: {entry}", flush=True)
    else:
        result = run_stage(cfg, "stage1", ds)
        if result.status == "done":  # a stage stopped early (a stop request) is not the key's result
            with atomic_dir(entry) as tmp:  # a kill mid-copy leaves no entry, never a partial one
                for name in STAGE1_KEPT:
                    _copy(os.path.join(stage_dir, name), os.path.join(tmp, name))
        return result.artifact
    for name in STAGE1_KEPT:
        _copy(os.path.join(entry, name), os.path.join(stage_dir, name))
    return cfg.layout.stage1_model


def stage1_key(cfg, ds: str, base: str) -> str:
    """Hash of what decides stage 1's result (not the output folder, stage 2, the references or the
    evaluation)."""
    settings = dataclasses.asdict(cfg)
    for name in ("output_dir", "paths", "stage2", "reference", "eval", "mine", "monitor", "stage"):
        settings.pop(name, None)
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in ("stage2", "stage1")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    code = sorted(glob.glob(os.path.join(ROOT, "autoregembed", "**", "*.py"), recursive=True)
                  + glob.glob(os.path.join(ROOT, "kernels", "*.py")))
    model_files = sorted(p for p in glob.glob(os.path.join(base, "*")) if os.path.isfile(p))
    named = [(os.path.relpath(p, ROOT), p) for p in code] + [(os.path.basename(p), p) for p in model_files]
    for name, path in [("rows", cfg.data.stage1), ("deepspeed", ds), *named]:  # the rows and config by content only
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return f"seed{cfg.seed}-{h.hexdigest()[:16]}"


def _copy(src: str, dst: str):
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif os.path.exists(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def _first_last(cfg, stage: str, n: int = 5) -> list[float]:
    """Mean loss of a stage's first and last ``n`` steps (from its metrics.jsonl)."""
    with open(os.path.join(cfg.layout.stage_dir(stage), "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    return [round(sum(losses[:n]) / n, 4), round(sum(losses[-n:]) / n, 4)]


def _last_gap(cfg) -> dict:
    """Stage 1's information gap at its last logged step (diagnostics.py), from its metrics.jsonl."""
    with open(os.path.join(cfg.layout.stage_dir("stage1"), "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "info_gap" in r][-1]
    return {"step": last["step"], "nats_per_token": round(last["info_gap"], 4),
            "nats_per_text": round(last["info_gap_text"], 3), "loss_shared": round(last["loss_shared"], 4)}


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


if __name__ == "__main__":
    main()
