"""Stage-2 training step: ours (fused scorer) vs naive (full decoder logits), side by side.

    python bench/throughput.py                    # SmolLM2-135M (V=49152), 8 negatives per query
    python bench/throughput.py --model tiny       # the built-in tiny model (seconds)

naive = the authors' approach: decoder(...).logits -> log_softmax -> gather, summed per sequence.
Both arms run the trainer's own step (step.optimizer_step) on the trainer's stage-2 session (DeepSpeed
engine, ``--deepspeed``: ZeRO-3 as users run it; fp32, gradient checkpointing on, the trainer's AdamW)
on the same batch, each in its own process, after one warm-up step.  Peak memory of a step, two ways
(bench/harness.py): bytes of live tensors the step allocated (profiler events: the same on any
machine) and resident memory, VmHWM reset after warm-up minus RSS before (allocator and kernel
dependent; reported as unreliable where the kernel ignores the reset).  Then the ZeRO-3 per-rank
peak RSS of a short stage-1 run at 1 vs 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from harness import (ROOT, free_port, json_child, peak_allocated_bytes, record_header,  # bench/harness.py
                     reset_rss_peak, rss_peak_resets, smollm2_dir, status_kb)


def _base(model: str) -> str:
    if model == "tiny":
        from autoregembed.run.config import Config
        from autoregembed.run.loading import build_tiny_base

        cfg = Config()
        out = os.path.join(tempfile.gettempdir(), "autoregembed-bench-tiny")
        return build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2])

    return smollm2_dir()


def _rows(n_queries: int, negatives: int):
    from autoregembed.ground.data import load_rows

    nli = load_rows(os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl"), stage=2)
    return [{**r, "neg": [nli[(i + j) % len(nli)]["pos"] for j in range(negatives)]} for i, r in enumerate(nli[:n_queries])]


def naive_head(head, hidden, labels, n_scored=None):
    """The authors' scoring of the decoder's hidden states: full logits over every position ->
    log_softmax -> gather, summed per row (``model.LogprobHead.forward`` with the scorer backend replaced;
    the decoder pass before it is the model's own)."""
    import torch

    logits = (hidden @ head.weight.T).float()  # [sequences, tokens, vocab]: what the scorer never forms
    lp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * (labels != -100)).sum(1)


def step_child(arm: str, base: str, queries: int, negatives: int, steps: int, ds: str) -> dict:
    """One arm: the trainer's stage-2 session (``Session``: DeepSpeed engine, fp32, gradient checkpointing,
    the trainer's AdamW) running the trainer's own optimizer step (``step.optimizer_step``); ``naive``
    swaps the LM head's scoring for ``naive_head`` and changes nothing else."""
    import shutil
    import types

    from autoregembed.ground import distributed as D
    from autoregembed.method.batches import to_device
    from autoregembed.run.config import load_config
    from autoregembed.run.session import RunContext, Session
    from autoregembed.run.stages import stages_for
    from autoregembed.run.step import optimizer_step
    from gpu_trainer import ConstantReferences  # bench/gpu_trainer.py

    D.init_distributed()
    out = tempfile.mkdtemp()
    cfg = load_config(None, [f"output_dir={out}", f"model.base={base}", "model.dtype=fp32",
                             "model.lora_rank=0", "model.gradient_checkpointing=true", "data.max_text_len=64",
                             "data.max_target_len=64", f"stage2.micro_batch_size={queries}", "stage2.learning_rate=1e-5"])
    st = stages_for(cfg)["stage2"]
    s = Session(RunContext.of(cfg, ds), st, base, train=True)
    engine, model = s.engine, s.model
    engine.train()  # as the trainer: HF models apply gradient checkpointing only in training mode
    if arm == "naive":
        model.head.forward = types.MethodType(naive_head, model.head)
    batch = st.make_batch(_rows(queries, negatives), s.text_encoder, ConstantReferences())
    loss_fn = st.loss()

    def step():
        return optimizer_step(engine, [batch], loss_fn)

    first_loss = float(step())  # warm-up: allocates Adam state, runtime buffers
    resets = rss_peak_resets()
    base_kb = status_kb("VmRSS")
    reset_rss_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    rss_peak = (status_kb("VmHWM") - base_kb) * 1024
    _, allocated_peak = peak_allocated_bytes(step)
    # the step's two halves as micro_step runs them: what the scorer changes (forward, loss, backward)
    # and what it does not (the engine's step: AdamW's update, whose temporaries are parameter-sized)
    on_device = to_device(batch, D.device())  # as optimizer_step moves it
    _, fwd_bwd_peak = peak_allocated_bytes(lambda: engine.backward(loss_fn(engine(on_device), on_device)))
    _, opt_peak = peak_allocated_bytes(engine.step)
    c = batch.candidates
    tokens = int(c.q_attention_mask.sum() + batch.p_attention_mask.sum() + 2 * c.pos_mask.sum() + c.neg_mask.sum())
    result = {"first_loss": first_loss, "step_s": dt, "tokens_per_s": tokens / dt, "peak_allocated_bytes": allocated_peak,
              "peak_allocated_loss_backward_bytes": fwd_bwd_peak, "peak_allocated_optimizer_bytes": opt_peak,
              "peak_rss_bytes": rss_peak, "rss_peak_resets": resets,
              "decoder_tokens": int(2 * c.pos_mask.sum() + c.neg_mask.sum()),
              "vocab": model.decoder.get_output_embeddings().weight.shape[0],
              "zero_stage": s.ds["zero_optimization"]["stage"]}
    s.close()
    D.shutdown()
    shutil.rmtree(out)
    return result


ZERO_CHILD = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
from autoregembed.run.stages import stages_for
from autoregembed.run.session import RunContext
from autoregembed.run.trainer import train_stage
out, base = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["output_dir=" + out, "model.base=" + base, "stage1.max_steps=3", "stage1.micro_batch_size=4",
                         "model.dtype=fp32"])
D.init_distributed()
train_stage(RunContext.of(cfg, {root!r} + "/ds_configs/zero3.json"), stages_for(cfg)["stage1"])
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] * 1024
print("PEAK", D.rank(), peak)
D.shutdown()
"""


def zero_ranks(base: str, nproc: int) -> list[int]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               "--no-python", sys.executable, "-c", ZERO_CHILD.format(root=ROOT), tmp, base]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.startswith("PEAK")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--base", default=None, help="a model folder in place of --model's")
    ap.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero3.json"),
                    help="the DeepSpeed config of both arms' engine (the trainer's default: ZeRO-3)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arm, base, q, n, s = args.child
        print(json.dumps(step_child(arm, base, int(q), int(n), int(s), args.deepspeed)))
        return
    base = args.base or _base(args.model)  # converted/cached once, outside the measured children
    res = {**record_header(), "command": " ".join(["python", "bench/throughput.py", *sys.argv[1:]])}
    for arm in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--child", arm, base, str(args.queries), str(args.negatives),
               str(args.steps), "--deepspeed", args.deepspeed]
        res[arm] = json_child(cmd)
    o, n = res["ours"], res["naive"]
    print(f"stage-2 step, {args.model} (V={o['vocab']}), {args.queries} queries x (1 positive + {args.negatives} "
          f"negatives), {o['decoder_tokens']} decoder tokens")
    print(f"  {'':8} {'step s':>8} {'tokens/s':>10} {'allocated MB':>13} {'RSS MB':>8} "
          f"{'loss fwd+bwd MB':>16} {'AdamW step MB':>14}")
    mb = 2**20
    for arm in ("ours", "naive"):
        r = res[arm]
        print(f"  {arm:8} {r['step_s']:8.2f} {r['tokens_per_s']:10.0f} {r['peak_allocated_bytes'] / mb:13.0f} "
              f"{r['peak_rss_bytes'] / mb:8.0f} {r['peak_allocated_loss_backward_bytes'] / mb:16.0f} "
              f"{r['peak_allocated_optimizer_bytes'] / mb:14.0f}")
    rss_note = "" if o["rss_peak_resets"] else " (this kernel ignores the VmHWM reset: RSS peaks are lifetime peaks)"
    print(f"  peak allocated ours/naive: loss forward+backward "
          f"{o['peak_allocated_loss_backward_bytes'] / n['peak_allocated_loss_backward_bytes']:.2f}, whole step "
          f"{o['peak_allocated_bytes'] / n['peak_allocated_bytes']:.2f}; "
          f"peak RSS ours/naive = {o['peak_rss_bytes'] / max(n['peak_rss_bytes'], 1):.2f}{rss_note}; "
          f"tokens/s ours/naive = {o['tokens_per_s'] / n['tokens_per_s']:.2f}")
    zero = {p: zero_ranks(base, p) for p in (1, 2)}
    res["zero3_peak_rss_per_rank"] = zero
    print("ZeRO-3 stage-1 run, peak RSS per rank (whole process: runtime + model states + activations):")
    for p, peaks in zero.items():
        print(f"  {p} rank(s): " + ", ".join(f"{x / 2**20:.0f} MB" for x in peaks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
