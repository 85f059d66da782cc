"""Two real processes (gloo, ZeRO-3): training, sharding, reference scores and export."""
import glob
import json
import os
import re

import numpy as np
import pytest
from safetensors import safe_open
from helpers import ROOT, child_env, run_child
from dist_worker import TEXTS

pytestmark = pytest.mark.distributed

WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def _repeated_data(tmp_path):
    """8 stage-1 and 8 stage-2 rows (1 to 3 negatives each), repeated every epoch."""
    nli = [json.loads(line) for line in open(os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl"))]
    s1 = tmp_path / "s1.jsonl"
    s1.write_text("".join(json.dumps({"context": r["query"], "instruction": "Reconstruct the original text.",
                                      "output": r["query"]}) + "\n" for r in nli[:8]))
    s2 = tmp_path / "s2.jsonl"
    rows = [{**r, "neg": [r["neg"]] + [nli[(i + j) % 50 + 8]["pos"] for j in range(1, i % 3 + 1)]}
            for i, r in enumerate(nli[:8])]
    s2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(s1), str(s2)


@pytest.fixture(scope="module", params=["full", "lora"])
def run(tmp_path_factory, request, default_tiny_base):
    """The whole pipeline on 2 ranks: fully fine-tuned with a reference-score file, and through LoRA
    adapters (merged on export) with in-batch negatives and online reference scores."""
    tmp = tmp_path_factory.mktemp(f"dist-{request.param}")
    s1, s2 = _repeated_data(tmp)
    out = str(tmp / "run")
    overrides = [f"output_dir={out}", f"data.stage1={s1}", f"data.stage2={s2}",
                 f"model.base={default_tiny_base}", "stage1.max_steps=16", "stage1.micro_batch_size=4",
                 "stage1.learning_rate=3e-3", "stage2.max_steps=12", "stage2.micro_batch_size=4",
                 "stage2.learning_rate=2e-3", "stage1.warmup_steps=0", "stage2.warmup_steps=0"]
    if request.param == "full":  # STS of the model in training, twice per stage; W&B (offline) from rank 0
        overrides += ["eval.every=8", f"eval.sts_file={os.path.join(ROOT, 'autoregembed', 'resources', 'sts_dev_sample.csv')}",
                      "monitor.wandb=true", "monitor.wandb_project=tests"]
    if request.param == "lora":  # and the frozen decoder partitioned with the encoder, every pass packed
        overrides += ["model.lora_rank=8", "stage1.learning_rate=1e-2", "stage2.learning_rate=2e-3",
                      "reference.source=online", "data.in_batch_negatives=true", "model.shard_decoder=true",
                      "model.shared_prefix=0", "model.packing=true"]
    proc = run_child([WORKER, tmp, os.path.join(ROOT, "ds_configs", "zero3.json"), *overrides], ranks=2, timeout=600,
                     env=child_env(WANDB_MODE="offline", WANDB_SILENT="true"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.load(open(tmp / f"report-rank{r}.json")) for r in range(2)]
    return out, reports, request.param, proc.stdout + proc.stderr


def _losses(out, stage):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, stage, "metrics.jsonl"))]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_loss_is_finite_and_decreases_on_repeated_data(run, stage):
    losses = _losses(run[0], stage)
    assert len(losses) == {"stage1": 16, "stage2": 12}[stage]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_each_step_reports_grad_norm_throughput_and_each_warning_once(run):
    for stage in ("stage1", "stage2"):
        records = [json.loads(line) for line in open(os.path.join(run[0], stage, "metrics.jsonl"))]
        assert all(r["grad_norm"] > 0 and np.isfinite(r["grad_norm"]) for r in records)
        assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in records)
        assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    progress = [line for line in run[3].splitlines() if "tok/s" in line]
    assert any(" step 16/16 loss " in line and " eta 0s" in line for line in progress), progress
    # stage 1's information gap at each logged step (10 and the last), summed over both ranks
    gaps = {r["step"]: r for r in map(json.loads, open(os.path.join(run[0], "stage1", "metrics.jsonl")))
            if "info_gap" in r}
    assert sorted(gaps) == [10, 16] and all(np.isfinite(r["info_gap"]) and r["loss_shared"] > 0 for r in gaps.values())
    assert any("info gap" in line and " step 16/16 " in line for line in progress), progress
    assert re.search(r"stage1: (WARNING: )?information gap -?[\d.]+ nats/token, -?[\d.]+ nats/text at step 16", run[3])
    if run[2] == "full":  # eval.every=8
        for stage in ("stage1", "stage2"):
            sts = {r["step"]: r["sts_spearman"] for r in map(json.loads, open(os.path.join(run[0], stage, "metrics.jsonl")))
                   if "sts_spearman" in r}
            assert sorted(sts) == ([8, 16] if stage == "stage1" else [8]), (stage, sts)
            assert all(-100 <= v <= 100 for v in sts.values())
    warnings = [line for line in run[3].splitlines() if "Warning: " in line]
    assert all(warnings.count(w) <= 2 for w in warnings), warnings  # once per rank at most


def test_weights_and_biases_gets_one_run_per_stage_with_every_step_record(run):
    """monitor.wandb, W&B offline (no network): each training stage's run, named <run>-<stage>, under
    <output_dir>/<stage>/wandb, holds every step record at its optimizer step, from rank 0 only."""
    from helpers import wandb_records

    if run[2] != "full":
        pytest.skip("W&B is on in the full-fine-tune run")
    for stage in ("stage1", "stage2"):
        (path,) = glob.glob(os.path.join(run[0], stage, "wandb", "offline-run-*", "run-*.wandb"))
        records = wandb_records(path)
        (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (meta.display_name, meta.project, meta.run_group) == (f"run-{stage}", "tests", "run")
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                history[items["_step"]] = items
        for record in map(json.loads, open(os.path.join(run[0], stage, "metrics.jsonl"))):
            assert history[record["step"]][f"{stage}/loss"] == pytest.approx(record["loss"])


def test_each_export_carries_a_card_that_says_how_it_trained(run):
    for stage, steps in (("stage1", 16), ("stage2", 12)):
        card = open(os.path.join(run[0], stage, "model", "README.md")).read()
        assert "pipeline_tag: sentence-similarity" in card and f"- steps: {steps}\n" in card, card
        assert "x 2 ranks" in card and f"- stage: {stage}\n" in card
        assert ("LoRA rank 8" in card) == (run[2] == "lora")


def test_each_rank_holds_half_of_every_parameter(run):
    for stage in ("stage1", "stage2"):
        per_rank = [r[stage] for r in run[1]]
        full = per_rank[0]["full"]
        for r in per_rank:
            # each parameter is split in two, padded to an even length
            assert full / 2 <= r["shard"] <= full / 2 + r["n_params"], (r["shard"], full)


def test_the_frozen_decoder_is_whole_outside_the_engine_unless_sharded(run):
    sharded = run[2] == "lora"  # model.shard_decoder=true there
    for stage in ("stage1", "stage2"):
        for r in run[1]:
            assert r[stage]["decoder_partitioned"] and set(r[stage]["decoder_partitioned"]) == {sharded}
            assert r[stage]["decoder_in_module"] == sharded


def test_only_the_encoder_trains_and_with_lora_only_its_adapters(run):
    for stage in ("stage1", "stage2"):
        names = run[1][0][stage]["trainable"]
        assert names and all(n.startswith("encoder.") for n in names)
        assert all(".lora_" in n for n in names) == (run[2] == "lora"), names[:5]


def test_reference_scores_cover_every_row_or_none_are_written_online(run):
    from autoregembed.run.refscores import ReferenceScores

    out = run[0]
    path = os.path.join(out, "reference", "scores.safetensors")
    if run[2] == "lora":  # reference.source=online: the adapters-off forward, no file
        assert not os.path.exists(os.path.join(out, "reference"))
        return
    assert len(ReferenceScores(path)) == 8


def test_export_reloads_in_a_fresh_process_with_plain_transformers(run):
    out, reports = run[:2]
    model_dir = os.path.join(out, "stage2", "model")
    files = glob.glob(os.path.join(model_dir, "*.safetensors"))
    assert files and os.path.exists(os.path.join(model_dir, "model.safetensors.index.json"))
    for f in files:
        with safe_open(f, "pt") as g:
            for k in g.keys():
                assert g.get_tensor(k).numel() > 0, k
    script = f"""
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
from autoregembed import Encoder
from autoregembed.method.model import compressed_states, pool_embedding
from autoregembed.method.tokenization import TextEncoder
TEXTS = {TEXTS!r}
meta = json.load(open({model_dir!r} + "/autoregembed.json"))
model = AutoModel.from_pretrained({model_dir!r}).eval()
te = TextEncoder(AutoTokenizer.from_pretrained({model_dir!r}), meta["num_embed_tokens"])
b = te.encode_inputs(TEXTS, [meta["instruction"]] * len(TEXTS))
with torch.no_grad():
    h = model(**b).last_hidden_state
pooled = None if meta["pooled"] is None else [i - 1 for i in meta["pooled"]]  # the e_i it names, 1-based
plain = pool_embedding(compressed_states(h, b["attention_mask"], meta["num_embed_tokens"]), pooled)
ours = Encoder.from_pretrained({model_dir!r}, device="cpu").encode(TEXTS, batch_size=2)
print(json.dumps({{"plain": plain.tolist(), "ours": ours.tolist()}}))
"""
    proc = run_child(["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    engine = np.array(reports[0]["stage2"]["embeddings"])
    for name in ("plain", "ours"):
        cos = np.sum(np.array(got[name]) * engine, axis=1)
        assert cos.min() > 0.9999, (name, cos)


def test_cross_device_negatives_on_two_ranks_train_as_one_process_with_the_whole_batch(tmp_path, default_tiny_base,
                                                                                       tiny_export):
    """data.cross_device_negatives on 2 gloo ranks of 3 rows each: every query is scored against all 6
    rows' texts, so the run is one process with micro-batches of 6 and in-batch negatives: the same
    candidates, the same mean loss, the same gradients, hence the same losses at every step."""
    _, s2 = _repeated_data(tmp_path)
    common = ["stage=stage2", f"model.base={default_tiny_base}", f"paths.stage1_model={tiny_export}",
              f"data.stage2={s2}", "model.lora_rank=4", "model.lora_dropout=0.0", "reference.source=online",
              "data.in_batch_negatives=true", "stage2.max_steps=3", "stage2.warmup_steps=0",
              "stage2.learning_rate=5e-3", "model.dtype=fp32", "model.decoder_bos=false"]  # as tiny_export's meta
    losses = {}
    for name, ranks, extra in (("two", 2, ["stage2.micro_batch_size=3", "data.cross_device_negatives=true"]),
                               ("one", 1, ["stage2.micro_batch_size=6"])):
        out = tmp_path / name
        args = [os.path.join(ROOT, "train.py"), "--deepspeed", os.path.join(ROOT, "ds_configs", "zero3.json"),
                *[a for kv in [f"output_dir={out}", *common, *extra] for a in ("--set", kv)]]
        proc = run_child(args, ranks=ranks, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        losses[name] = _losses(str(out), "stage2")
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=2e-4)
    card = open(tmp_path / "two" / "stage2" / "model" / "README.md").read()
    assert "cross_device_negatives=True" in card
