"""AutoRegEmbed vs its baselines on a real LLM (SmolLM2-135M-Instruct), STS-B dev, on CPU.

    python bench/quality.py                  # ~45 min on 2 cores; writes bench/results/quality.{json,png}
    python bench/quality.py --steps 20       # a quick pilot

Arms (same base model, same instruction, same pooling unless stated):
  (a) base model: mean of the k EMBED hidden states; and last-token PromptEOL
  (b) contrastive fine-tune: InfoNCE (in-batch + hard negatives, tau=0.05) on the NLI triplets,
      for as many optimizer steps as (d) takes in total
  (c) AutoRegEmbed stage 1 only (STS-B train + NLI sentences, autoencoding instruction)
  (d) AutoRegEmbed stage 1 + stage 2 (NLI triplets, reference scores from (c))
Stages (c)/(d) run through the trainer users run (DeepSpeed ZeRO-3, one process).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoregembed import distributed as D  # noqa: E402
from autoregembed.config import load_config  # noqa: E402
from autoregembed.data import load_rows  # noqa: E402
from autoregembed.encoder import Encoder  # noqa: E402
from autoregembed.evaluate import read_sts, sts_spearman  # noqa: E402
from autoregembed.export import export_encoder  # noqa: E402
from autoregembed.loading import load_model  # noqa: E402
from autoregembed.tokenization import TextEncoder  # noqa: E402
from autoregembed.trainer import score_references, train_stage  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
AUTOENCODE = "Reconstruct the original text."
INSTRUCTION = "Retrieve semantically similar text."
K = 5


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


def _meta(stage: str) -> dict:
    """autoregembed.json for the exports this benchmark writes outside the trainer."""
    return {"num_embed_tokens": K, "instruction": INSTRUCTION, "max_text_len": 64, "stage": stage}


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
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps of stage 1 and of stage 2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stage1-lr", type=float, default=2e-4)
    ap.add_argument("--stage2-lr", type=float, default=2e-5)
    ap.add_argument("--contrastive-lr", type=float, default=5e-5)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    from real_model import smollm2_dir

    base = smollm2_dir()
    sts = os.path.join(SHARED, "stsb", "sts-dev.csv")
    read_sts(sts)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    s1 = stage1_file(os.path.join(args.out, "stage1.jsonl"))
    s2 = os.path.join(SHARED, "nli", "medi_nli.jsonl")
    results, timings = {}, {}
    D.init_distributed()

    def timed(name, fn):
        t0 = time.time()
        value = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"[quality] {name}: {value if not isinstance(value, tuple) else value[0]} ({timings[name]} s)", flush=True)
        return value

    # (c) and (d) through the real trainer
    cfg = load_config(None, [f"output_dir={args.out}", f"model.base={base}", f"model.num_embed_tokens={K}",
                             "model.dtype=fp32", "model.gradient_checkpointing=false", f"data.stage1={s1}", f"data.stage2={s2}", f"eval.sts_file={sts}",
                             f"eval.instruction={INSTRUCTION}", "data.max_text_len=64", "data.max_target_len=64",
                             f"stage1.max_steps={args.steps}", f"stage1.micro_batch_size={args.batch}",
                             f"stage1.learning_rate={args.stage1_lr}", "stage1.warmup_steps=10",
                             f"stage2.max_steps={args.steps}", f"stage2.micro_batch_size={args.batch // 2}",
                             f"stage2.learning_rate={args.stage2_lr}", "stage2.warmup_steps=10",
                             "stage1.log_every=10", "stage2.log_every=10"])
    ds = os.path.join(ROOT, "ds_configs", "zero3.json")
    stage1_dir = timed("train (c) stage 1", lambda: train_stage(cfg, "stage1", ds))
    results["(c) stage 1 only"] = timed("eval (c)", lambda: sts_spearman(Encoder.from_pretrained(stage1_dir), sts))
    timed("reference scores", lambda: score_references(cfg, ds))
    stage2_dir = timed("train (d) stage 2", lambda: train_stage(cfg, "stage2", ds))
    results["(d) stage 1 + stage 2"] = timed("eval (d)", lambda: sts_spearman(Encoder.from_pretrained(stage2_dir), sts))
    D.shutdown()

    nli = load_rows(s2, stage=2)
    c_dir, c_losses = timed("train (b) contrastive", lambda: contrastive(
        base, nli, 2 * args.steps, args.batch, args.contrastive_lr, os.path.join(args.out, "contrastive"), 0))
    results["(b) contrastive (InfoNCE)"] = timed("eval (b)", lambda: sts_spearman(Encoder.from_pretrained(c_dir), sts))

    # (a) the base model: EMBED tokens appended to the untrained model, and PromptEOL
    base_embed = os.path.join(args.out, "base-embed")
    m, tok = load_model(base, base, K, torch.float32, "sdpa")
    export_encoder(m.encoder, tok, base_embed, _meta("base"))
    del m
    results["(a) base, mean of EMBED states"] = timed("eval (a) embed", lambda: sts_spearman(
        Encoder.from_pretrained(base_embed), sts))
    results["(a) base, PromptEOL last token"] = timed("eval (a) prompteol", lambda: sts_spearman(PromptEOL(base), sts))

    order = ["(a) base, mean of EMBED states", "(a) base, PromptEOL last token", "(b) contrastive (InfoNCE)",
             "(c) stage 1 only", "(d) stage 1 + stage 2"]
    print("\nSTS-B dev Spearman x100 (SmolLM2-135M-Instruct, CPU)")
    for name in order:
        print(f"  {name:<34} {results[name]:6.2f}")
    record = {"model": "SmolLM2-135M-Instruct", "steps_per_stage": args.steps, "batch": args.batch,
              "contrastive_steps": 2 * args.steps, "lrs": {"stage1": args.stage1_lr, "stage2": args.stage2_lr,
                                                           "contrastive": args.contrastive_lr},
              "spearman_x100": {n: round(results[n], 2) for n in order}, "seconds": timings,
              "contrastive_loss_first_last": [c_losses[0], c_losses[-1]]}
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump(record, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(order[::-1], [results[n] for n in order[::-1]], color=["#4c72b0"] * 3 + ["#999999"] * 2)
    ax.set_xlabel("STS-B dev Spearman x100")
    ax.set_title(f"SmolLM2-135M-Instruct, {args.steps} steps per stage, CPU")
    for i, n in enumerate(order[::-1]):
        ax.text(results[n] + 0.5, i, f"{results[n]:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "quality.png"), dpi=100)
    print(f"wrote {args.results}/quality.json and quality.png; total {sum(timings.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
