"""AutoRegEmbed vs its baselines on a real LLM (SmolLM2-135M-Instruct), STS-B dev, on CPU.

    python bench/quality.py                     # ~45 min on 2 cores; writes bench/results/quality.{json,png}
    python bench/quality.py --arms cd           # only stages (c)/(d), while tuning their settings
    python bench/quality.py --arms c --no-decoder-scale   # stage 1 as the authors' code runs it
    python bench/quality.py --arms cd --no-decoder-bos    # the decoder input as published
    python bench/quality.py --row-instructions  # stage 2 and (b) with the NLI rows' own instruction
    python bench/quality.py --arms cd --no-detach-positive   # stage 2's gradient also through c_p, as published
    python bench/quality.py --arms cd --stage2-seeds ""      # (c) and one (d), without the extra stage-2 seeds

Arms (same base model, same instruction, same pooling unless stated):
  (a) base model: mean of the k EMBED hidden states; and last-token PromptEOL
  (b) contrastive fine-tune: InfoNCE (in-batch + hard negatives, tau=0.05) on the NLI triplets (d)
      trains on, as many triplets per step as stage 2, for as many optimizer steps as (d) takes in total
  (c) AutoRegEmbed stage 1 only (STS-B train + NLI sentences, autoencoding instruction)
  (d) AutoRegEmbed stage 1 + stage 2 (NLI triplets, reference scores from (c); LoRA adapters)
Stages (c)/(d) run through the trainer users run (DeepSpeed, one process), with the
trainer's default stage-1 initialisation (decoder_scale.py) unless --no-decoder-scale, and with the
decoder reading its BOS before the compressed tokens (model.decoder_bos) unless --no-decoder-bos.
(b) and (d) train with the evaluation's instruction in place of the NLI rows' own unless
--row-instructions (stage2_file says why), and stage 2 holds c_p = log p(pos|e_pos) as a target
(loss.detach_positive; losses.alignment_loss says why) unless --no-detach-positive.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoregembed import distributed as D  # noqa: E402
from autoregembed.config import load_config  # noqa: E402
from autoregembed.data import load_rows  # noqa: E402
from autoregembed.encoder import Encoder  # noqa: E402
from autoregembed.evaluate import read_sts, sts_eval  # noqa: E402
from autoregembed.export import ExportMeta, export_encoder  # noqa: E402
from autoregembed.loading import load_model  # noqa: E402
from autoregembed.tokenization import TextEncoder  # noqa: E402
from autoregembed.trainer import score_references, train_stage  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
AUTOENCODE = "Reconstruct the original text."
INSTRUCTION = "Retrieve semantically similar text."
K = 5
ARMS = ["(a) base, mean of EMBED states", "(a) base, PromptEOL last token", "(b) contrastive (InfoNCE)",
        "(c) stage 1 only", "(d) stage 1 + stage 2"]


def stage1_file(path: str, n_sts: int = 3000):
    """Autoencoding rows: STS-B train sentences and NLI sentences."""
    with open(os.path.join(SHARED, "stsb", "sts-train.csv"), encoding="utf-8") as f:
        sts = [r[c] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7 for c in (5, 6)]
    nli = load_rows(os.path.join(SHARED, "nli", "medi_nli.jsonl"), stage=2)
    sents = list(dict.fromkeys(random.Random(0).sample(sts, n_sts) +
                               [s for r in nli for s in [r["query"], r["pos"], *r["neg"]]]))
    with open(path, "w", encoding="utf-8") as f:
        for s in sents:
            f.write(json.dumps({"context": s, "instruction": AUTOENCODE, "output": s}) + "\n")
    return path


def stage2_file(path: str, n_rows: int, instruction: str | None):
    """The first ``n_rows`` NLI triplets: what (b) and (d) train on.  Fewer rows than the
    file holds keep reference scoring (which scores every row once) inside the time budget.

    ``instruction`` replaces each row's own ("Given a premise, retrieve a hypothesis that
    entails the premise.") with the one the evaluation uses, as the authors' code trains stage 2
    with the prompt it evaluates with.  On the same stage-1 model that took (d) from 71.42 to
    73.70 (seed 42, DEVELOPERS.md); (b) gains more.  None keeps the rows' own."""
    with open(os.path.join(SHARED, "nli", "medi_nli.jsonl"), encoding="utf-8") as src:
        rows = [json.loads(line) for line in src if line.strip()][:n_rows]
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "instruction": instruction or row["instruction"]}) + "\n")
    return path


def _meta(stage: str) -> ExportMeta:
    """autoregembed.json for the exports this benchmark writes outside the trainer."""
    return ExportMeta(num_embed_tokens=K, instruction=INSTRUCTION, max_text_len=64, stage=stage)


class PromptEOL:
    """Last-token hidden state of 'This sentence : "<text>" means in one word:"' (Jiang et al. 2023)."""

    def __init__(self, path):
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"

    @torch.no_grad()
    def encode(self, sentences, batch_size=64, **kw):
        out = []
        for i in range(0, len(sentences), batch_size):
            prompts = [f'This sentence : "{s}" means in one word:"' for s in sentences[i : i + batch_size]]
            b = self.tok(prompts, return_tensors="pt", padding=True)
            out.append(F.normalize(self.model(**b).last_hidden_state[:, -1], dim=-1))
        return torch.cat(out).numpy()


def contrastive(base: str, rows, steps: int, batch: int, lr: float, out_dir: str, seed: int) -> str:
    """InfoNCE on (query, pos, hard neg) with in-batch negatives; same encoder, pooling and export."""
    torch.manual_seed(seed)
    model, tok = load_model(base, base, K, torch.float32, "sdpa", gradient_checkpointing=False)
    te = TextEncoder(tok, K, 64, 64)
    enc = model.encoder.train()
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        b = rng.sample(rows, batch)
        texts = [r["query"] for r in b] + [r["pos"] for r in b] + [r["neg"][0] for r in b]
        x = te.encode_inputs(texts, [r["instruction"] for r in b] * 3)
        e = model.embed(**x)
        q, d = e[:batch], e[batch:]
        loss = F.cross_entropy(q @ d.T / 0.05, torch.arange(batch))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    export_encoder(enc, tok, out_dir, _meta("contrastive"))
    return out_dir, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1-steps", type=int, default=50)
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="stage-1 rows per step; stage 2 and (b) take half as many triplets")
    ap.add_argument("--nli-rows", type=int, default=240, help="NLI triplets (b) and (d) train on")
    ap.add_argument("--row-instructions", action="store_true",
                    help="(b) and (d) train with the NLI rows' own instruction, not the evaluation's")
    ap.add_argument("--stage1-lr", type=float, default=1e-4)
    ap.add_argument("--stage2-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lora-rank", type=int, default=16, help="> 0: stage 2 trains LoRA adapters")
    ap.add_argument("--contrastive-lr", type=float, default=5e-5)
    ap.add_argument("--no-decoder-scale", action="store_true",
                    help="stage 1 without the final-norm rescale (model.match_decoder_scale=false: the authors' setup)")
    ap.add_argument("--no-decoder-bos", action="store_true",
                    help="the decoder reads [e_1..e_k ; target] as published, not [BOS ; e_1..e_k ; target] "
                         "(model.decoder_bos=false)")
    ap.add_argument("--no-detach-positive", action="store_true",
                    help="stage 2 back-propagates through c_p = log p(pos|e_pos) as published "
                         "(loss.detach_positive=false); at stage-2 seed 1 that collapsed the embeddings")
    ap.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero3.json"),
                    help="DeepSpeed config for (c)/(d); with one process ZeRO-2 runs a stage-1 step in "
                         "6.1 s instead of ZeRO-3's 9.4 s (nothing to shard, no per-layer gathers)")
    ap.add_argument("--seed", type=int, default=42,
                    help="the trainer's seed for (c)/(d) (data order, calibration rows, EMBED init) and (b)'s; "
                         "stage 1 varies a lot from seed to seed (README)")
    ap.add_argument("--stage2-seeds", default="1,2",
                    help="comma-separated extra seeds: after (d), stage 2 again on the same stage-1 model and "
                         "reference scores with each seed (data order, adapter init), ~6 min each; at this "
                         "budget stage 2 varies by a few points from seed to seed (README)")
    ap.add_argument("--arms", default="abcd", help="which arms to run, e.g. 'cd' while tuning stage settings")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    try:  # the chart is drawn at the very end: fail now, not after 30 minutes of work
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench/quality.py needs matplotlib (and gguf for the one-off model conversion): pip install gguf matplotlib")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    from real_model import smollm2_dir

    base = smollm2_dir()
    sts = os.path.join(SHARED, "stsb", "sts-dev.csv")
    read_sts(sts)
    stage2_seeds = [int(x) for x in args.stage2_seeds.split(",") if x.strip()]
    for stale in ("stage1", "reference", "stage2", "contrastive", "base-embed",
                  *(f"stage2-seed{n}" for n in stage2_seeds)):  # a fresh run every time
        shutil.rmtree(os.path.join(args.out, stale), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    s1 = stage1_file(os.path.join(args.out, "stage1.jsonl"))
    s2 = stage2_file(os.path.join(args.out, "stage2.jsonl"), args.nli_rows,
                     None if args.row_instructions else INSTRUCTION)
    results, timings, seeded = {}, {}, {}  # arm -> sts_eval dict; extra stage-2 seed -> sts_eval dict
    D.init_distributed()

    def timed(name, fn):
        t0 = time.time()
        value = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"[quality] {name}: {value if not isinstance(value, tuple) else value[0]} ({timings[name]} s)", flush=True)
        return value

    def scored(name, encoder_fn):
        return timed(name, lambda: sts_eval(encoder_fn(), sts, show_progress_bar=False))

    # (c) and (d) through the real trainer
    overrides = [f"output_dir={args.out}", f"model.base={base}", f"model.num_embed_tokens={K}", "model.dtype=fp32",
                 "model.gradient_checkpointing=false", f"data.stage1={s1}", f"data.stage2={s2}",
                 f"eval.sts_file={sts}", f"eval.instruction={INSTRUCTION}", "data.max_text_len=64",
                 "data.max_target_len=64", "stage1.log_every=10", "stage2.log_every=10",
                 f"model.match_decoder_scale={not args.no_decoder_scale}",
                 f"model.decoder_bos={not args.no_decoder_bos}",
                 f"loss.detach_positive={not args.no_detach_positive}", f"seed={args.seed}"]
    for stage, steps, batch, lr in (("stage1", args.stage1_steps, args.batch, args.stage1_lr),
                                    ("stage2", args.stage2_steps, args.batch // 2, args.stage2_lr)):
        overrides += [f"{stage}.max_steps={steps}", f"{stage}.micro_batch_size={batch}",
                      f"{stage}.learning_rate={lr}", f"{stage}.warmup_steps={max(1, steps // 5)}"]
    cfg = load_config(None, overrides)
    stage2_overrides = overrides + [f"model.lora_rank={args.stage2_lora_rank}"]
    cfg2 = load_config(None, stage2_overrides)
    ds = args.deepspeed
    c_losses = None
    contrastive_steps = args.stage1_steps + args.stage2_steps  # as many as (d) takes in total
    if "c" in args.arms or "d" in args.arms:
        stage1_dir = timed("train (c) stage 1", lambda: train_stage(cfg, "stage1", ds).artifact)
        results["(c) stage 1 only"] = scored("eval (c)", lambda: Encoder.from_pretrained(stage1_dir))
    if "d" in args.arms:
        timed("reference scores", lambda: score_references(cfg, ds))
        stage2_dir = timed("train (d) stage 2", lambda: train_stage(cfg2, "stage2", ds).artifact)
        results["(d) stage 1 + stage 2"] = scored("eval (d)", lambda: Encoder.from_pretrained(stage2_dir))
        for n in stage2_seeds:  # the same stage-1 model and reference scores, another stage-2 seed
            cfg_n = load_config(None, stage2_overrides + [f"seed={n}",
                                                           f"output_dir={os.path.join(args.out, f'stage2-seed{n}')}",
                                                           f"paths.stage1_model={cfg.stage1_model_dir}",
                                                           f"paths.reference_scores={cfg.reference_scores_path}"])
            dir_n = timed(f"train (d) stage 2, seed {n}", lambda: train_stage(cfg_n, "stage2", ds).artifact)
            seeded[n] = scored(f"eval (d) stage-2 seed {n}", lambda: Encoder.from_pretrained(dir_n))
    D.shutdown()

    if "b" in args.arms:
        c_dir, c_losses = timed("train (b) contrastive", lambda: contrastive(
            base, load_rows(s2, stage=2), contrastive_steps, args.batch // 2, args.contrastive_lr,
            os.path.join(args.out, "contrastive"), args.seed))
        results["(b) contrastive (InfoNCE)"] = scored("eval (b)", lambda: Encoder.from_pretrained(c_dir))

    if "a" in args.arms:  # the base model: EMBED tokens appended to the untrained model, and PromptEOL
        base_embed = os.path.join(args.out, "base-embed")
        m, tok = load_model(base, base, K, torch.float32, "sdpa")
        export_encoder(m.encoder, tok, base_embed, _meta("base"))
        del m
        results["(a) base, mean of EMBED states"] = scored("eval (a) embed",
                                                           lambda: Encoder.from_pretrained(base_embed))
        results["(a) base, PromptEOL last token"] = scored("eval (a) prompteol", lambda: PromptEOL(base))

    order = [n for n in ARMS if n in results]
    print("\nSTS-B dev (SmolLM2-135M-Instruct, CPU)    Spearman x100   mean pairwise cosine")
    for name in order:
        print(f"  {name:<34} {results[name]['spearman']:6.2f}          {results[name]['mean_cosine']:.3f}")
    for n, r in seeded.items():
        print(f"  {f'(d) with stage-2 seed {n}':<34} {r['spearman']:6.2f}          {r['mean_cosine']:.3f}")
    if len(order) < len(ARMS):
        print("not all arms ran: results not written")
        return
    record = {"model": "SmolLM2-135M-Instruct", "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
              "deepspeed": os.path.relpath(args.deepspeed, ROOT),
              "steps": {"stage1": args.stage1_steps, "stage2": args.stage2_steps, "contrastive": contrastive_steps},
              "batch": {"stage1": args.batch, "stage2_and_contrastive": args.batch // 2}, "nli_rows": args.nli_rows,
              "stage2_instruction": "rows' own" if args.row_instructions else INSTRUCTION,
              "stage2_lora_rank": args.stage2_lora_rank,
              "lrs": {"stage1": args.stage1_lr, "stage2": args.stage2_lr, "contrastive": args.contrastive_lr},
              "seed": args.seed, "spearman_x100": {n: round(results[n]["spearman"], 2) for n in order},
              "mean_pairwise_cosine": {n: round(results[n]["mean_cosine"], 4) for n in order}, "seconds": timings,
              "stage2_seeds_spearman_x100": {n: round(r["spearman"], 2) for n, r in seeded.items()},
              "match_decoder_scale": not args.no_decoder_scale, "decoder_bos": not args.no_decoder_bos,
              "detach_positive": not args.no_detach_positive,
              "loss_first_last": {"stage1": _first_last(cfg, "stage1"), "stage2": _first_last(cfg, "stage2"),
                                  "contrastive": [c_losses[0], c_losses[-1]]}}
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot({n: results[n]["spearman"] for n in order}, order, f"{args.stage1_steps}+{args.stage2_steps} steps",
         os.path.join(args.results, "quality.png"))
    print(f"wrote {args.results}/quality.json and quality.png; total {sum(timings.values()) / 60:.1f} min")


def _first_last(cfg, stage: str, n: int = 5) -> list[float]:
    """Mean loss of a stage's first and last ``n`` steps (from its metrics.jsonl)."""
    with open(os.path.join(cfg.stage_dir(stage), "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    return [round(sum(losses[:n]) / n, 4), round(sum(losses[-n:]) / n, 4)]


def plot(results: dict, order: list[str], steps: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ours = ("(c)", "(d)")
    ax.barh(order[::-1], [results[n] for n in order[::-1]],
            color=["#dd8452" if n.startswith(ours) else "#4c72b0" for n in order[::-1]])
    ax.set_xlim(0, max(results[n] for n in order) + 8)  # room for the value labels
    ax.set_xlabel("STS-B dev Spearman x100")
    ax.set_title(f"SmolLM2-135M-Instruct, stage 1+2: {steps}, CPU")
    for i, n in enumerate(order[::-1]):
        ax.text(results[n] + 0.5, i, f"{results[n]:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
