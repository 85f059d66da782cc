"""Does ZeRO-3 shard what ``autoregembed plan`` says it does?  Measured on CPU with gloo.

    python bench/zero3_scaling.py            # 1, 2, 4 ranks and 2 x 2 with hpZ; bench/results/zero3_scaling.json

A LLaMA with LLaMA-2-7B's layer shapes (hidden 4096, FFN 11008, 32 heads, vocabulary 32000) and 2
layers trains one stage-1 and one stage-2 optimizer step (the trainer's Session and step, bf16,
ds_configs/zero3.json) on 1, 2 and 4 ranks, and on 2 "nodes" of 2 ranks (two launchers on loopback)
under ds_configs/zero3_multinode.json, whose hpZ keeps a second parameter copy within each node.
Each rank then counts the bytes it holds, by DeepSpeed's own bookkeeping: its partition of every
encoder parameter (``ds_tensor``; hpZ's ``ds_secondary_tensor``), its gradient partition buffer, its
fp32 master partition and Adam's two moments, and the frozen decoder's replica.  Each is
printed beside plan's prediction for the same shapes and rank count (tools/plan.py), and fails the
run when they differ by more than 10%.  Short texts: none of these bytes depends on them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from harness import ROOT, free_port, record_header

SHAPE = dict(hidden=4096, intermediate=11008, heads=32, layers=2, vocab=32000)
MICRO, NEGATIVES, LENGTH, K, PREFIX = 2, 3, 32, 5, 5
KEYS = {"encoder parameters (bf16)": "params", "gradients (fp32)": "grads",
        "optimizer (fp32 master + Adam m, v)": "optimizer", "decoder parameters (bf16, frozen)": "decoder",
        "hpZ secondary parameters (bf16)": "secondary"}
RUNS = [(1, 1), (2, 1), (4, 1), (2, 2)]  # (ranks per node, nodes): the last under zero3_multinode.json
TOLERANCE = 0.10


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def secondary_bytes(engine) -> int:
    """hpZ's second parameter copy on this rank: it lives from the first gather of a step's forward
    until the optimizer step invalidates it (so it is read between backward and step)."""
    return _nbytes(p.ds_secondary_tensor for p in engine.module.parameters()
                   if getattr(p, "ds_secondary_tensor", None) is not None)


def measure(engine, decoder, secondary: int) -> dict:
    """This rank's bytes of encoder parameters, gradients and optimizer state (ZeRO-3's own
    partitions) and of the decoder's replica."""
    opt = engine.optimizer
    states = [v for st in opt.optimizer.state.values() for v in st.values() if hasattr(v, "numel") and v.dim() > 0]
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_tensor")]
    return {"params": _nbytes(p.ds_tensor for p in params), "secondary": secondary,
            "grads": _nbytes([opt.grad_partitions_flat_buffer]),
            "optimizer": _nbytes(opt.fp32_partitioned_groups_flat) + _nbytes(states),
            "decoder": _nbytes(decoder.parameters())}


def worker(base: str, stage: str, out: str, ds_name: str):
    import torch

    from autoregembed.ground import distributed as D
    from autoregembed.run.config import load_config
    from autoregembed.run.stages import stages_for
    from autoregembed.run.session import RunContext, Session
    from autoregembed.run.step import optimizer_step
    from gpu_trainer import ConstantReferences, texts

    D.init_distributed()
    cfg = load_config(None, [f"output_dir={out}/run", f"model.base={base}", "model.dtype=bf16",
                             "model.match_decoder_scale=false", f"model.shared_prefix={PREFIX}",
                             f"data.max_text_len={LENGTH}", f"data.max_target_len={LENGTH}",
                             f"{stage}.micro_batch_size={MICRO}"])
    st = stages_for(cfg)[stage]
    s = Session(RunContext.of(cfg, os.path.join(ROOT, "ds_configs", ds_name)), st, base, train=True)
    s.model.shared_prefix = 0.02 * torch.randn(PREFIX, SHAPE["hidden"], dtype=torch.bfloat16, device=s.device)
    it = iter(texts(s.tokenizer, [LENGTH] * MICRO * (2 + NEGATIVES), seed=D.rank()))
    rows = ([{"context": next(it), "instruction": "Reconstruct the original text.", "output": next(it)}
             for _ in range(MICRO)] if stage == "stage1" else
            [{"query": next(it), "pos": next(it), "neg": [next(it) for _ in range(NEGATIVES)],
              "instruction": "Retrieve semantically similar text."} for _ in range(MICRO)])
    s.engine.train()
    held = {}
    loss = optimizer_step(s.engine, [st.make_batch(rows, s.text_encoder, ConstantReferences())], st.loss(),
                          after_backward=lambda engine: held.update(secondary=secondary_bytes(engine)))
    got = D.all_gather_objects({**measure(s.engine, s.model.decoder, held["secondary"]), "loss": loss.item(),
                                "hpz": s.ds["zero_optimization"].get("zero_hpz_partition_size", 1)})
    if D.rank() == 0:
        print("RESULT " + json.dumps(got), flush=True)
    s.close()
    D.shutdown()


def planned(arch, per_node: int, nodes: int, stage: str) -> dict:
    from autoregembed.tools.plan import plan

    p = plan(arch, per_node * nodes, 3, MICRO, NEGATIVES, LENGTH, k=K, stage=int(stage[-1]), prefix=PREFIX,
             contrast=stage == "stage1", hpz=per_node if nodes > 1 else 0)
    return {short: p["breakdown"].get(key, 0.0) for key, short in KEYS.items()}


def launch(per_node: int, nodes: int, args: list[str]) -> list[dict]:
    """The worker on ``nodes`` x ``per_node`` ranks: one launcher per "node", all on loopback, each
    rank with its share of the cores; returns rank 0's gathered per-rank records."""
    cores, port = os.cpu_count() or 1, free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // (per_node * nodes))), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank",
                               str(n), "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), os.path.abspath(__file__), "--worker", *args],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(nodes)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{args} on {nodes} x {per_node} ranks failed:\n" + "\n".join(e[-3000:] for _, e in outs))
    return json.loads(outs[0][0].split("RESULT ")[-1].splitlines()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "zero3_scaling.json"))
    ap.add_argument("--runs", default=",".join(f"{n}x{r}" for r, n in RUNS), help="NODESxRANKS, comma-separated")
    ap.add_argument("--worker", nargs=4, metavar=("BASE", "STAGE", "DIR", "DS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    from autoregembed.ground.arch import Arch
    from gpu_trainer import random_llama

    tmp = tempfile.mkdtemp(prefix="zero3-scaling-")
    base, hf = random_llama(tmp, dtype=torch.bfloat16, **SHAPE)
    arch = Arch.from_config(hf.to_dict())
    rows, ok = [], True
    print(f"{'stage':<7} {'ranks':>5}  {'held by each rank':<12} {'measured MB':>12} {'plan MB':>10} {'ratio':>6}")
    for run in args.runs.split(","):
        nodes, per_node = map(int, run.split("x"))
        ds_name = "zero3_multinode.json" if nodes > 1 else "zero3.json"
        for stage in ("stage1", "stage2"):
            per_rank = launch(per_node, nodes, [base, stage, os.path.join(tmp, f"{stage}-{run}"), ds_name])
            plan_bytes = planned(arch, per_node, nodes, stage)
            for what in KEYS.values():
                measured = max(r[what] for r in per_rank)  # the fullest rank: what must fit
                if not measured and not plan_bytes[what]:
                    continue  # no hpZ copy, and none planned
                ratio = measured / plan_bytes[what] if plan_bytes[what] else float("inf")
                ok &= abs(ratio - 1) <= TOLERANCE
                rows.append({"stage": stage, "nodes": nodes, "ranks_per_node": per_node, "config": ds_name,
                             "what": what, "measured_bytes_max": measured,
                             "measured_bytes_per_rank": [r[what] for r in per_rank], "plan_bytes": plan_bytes[what],
                             "ratio": ratio, "loss": per_rank[0]["loss"]})
                print(f"{stage:<7} {run:>5}  {what:<12} {measured / 2**20:>12.1f} {plan_bytes[what] / 2**20:>10.1f} "
                      f"{ratio:>6.3f}{'' if abs(ratio - 1) <= TOLERANCE else '  OFF BY MORE THAN 10%'}", flush=True)
    result = {**record_header(), "shape": SHAPE, "micro_batch": MICRO, "negatives": NEGATIVES, "max_len": LENGTH,
              "k": K, "shared_prefix": PREFIX, "tolerance": TOLERANCE, "within_tolerance": ok, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}: {'every figure within 10% of plan' if ok else 'SOME FIGURES OFF BY MORE THAN 10%'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
