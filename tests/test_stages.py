"""The stage list (stages.PIPELINE): what a pipeline runs, what each stage checks before any model
loads (skipping what an earlier stage of the same run writes), and the optional mining stage run for
real between stage 1 and reference scoring."""
import dataclasses
import json
import os

import pytest

from autoregembed.release.meta import META_FILE, ExportMeta
from autoregembed.run.config import ConfigError, load_config
from autoregembed.run.stages import PIPELINE, RUN_MODES, TRAINING, stages_for
from helpers import ROOT, TINY_BASE, run_child, run_train

NLI = os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl")


def _names(cfg):
    return [s.name for s in stages_for(cfg).planned()]


def test_the_pipeline_and_the_run_modes_come_from_one_list():
    assert [s.name for s in PIPELINE] == ["stage1", "mine", "reference", "stage2", "export", "eval"]
    assert RUN_MODES == (*(s.name for s in PIPELINE), "pipeline") and TRAINING == ("stage1", "stage2")
    assert _names(load_config(None)) == ["stage1", "reference", "stage2", "eval"]
    assert _names(load_config(None, ["mine.enabled=true"])) == ["stage1", "mine", "reference", "stage2", "eval"]
    online = ["reference.source=online", "model.lora_rank=4"]
    assert _names(load_config(None, online)) == ["stage1", "stage2", "eval"]
    assert _names(load_config(None, ["stage=mine"])) == ["mine"]
    with pytest.raises(ConfigError, match=r"key 'stage': 'stage3' is not one of stage1, mine, reference"):
        stages_for(load_config(None, ["stage=stage3"])).planned()
    r = run_child(["-m", "autoregembed.tools.cli", "stages", "--set", "mine.enabled=true", "--set", online[0],
                   "--set", online[1]], timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["stage1", "mine", "stage2", "eval"], r.stderr[-2000:]


def test_checks_skip_only_what_an_earlier_stage_of_the_run_writes(tmp_path):
    out = str(tmp_path / "run")
    # a pipeline: the stage-1 export, the mined rows and the reference scores do not exist yet, and need not
    stages_for(load_config(None, [f"output_dir={out}", "mine.enabled=true"])).check()
    # each stage alone needs what the stages before it would have written
    with pytest.raises(ConfigError, match=r"key 'paths.stage1_model': no stage-1 export at .*run stage1 first"):
        stages_for(load_config(None, [f"output_dir={out}", "stage=mine", "mine.enabled=true"])).check()
    os.makedirs(os.path.join(out, "stage1", "model"))
    with pytest.raises(ConfigError, match=r"the mined rows of .*nli_sample.jsonl \(mine.enabled\): no such file "
                                          r".*mine/0-nli_sample.jsonl; run stage=mine first"):
        stages_for(load_config(None, [f"output_dir={out}", "stage=reference", "mine.enabled=true"])).check()
    with pytest.raises(ConfigError, match=r"key 'paths.reference_scores': no reference scores .*run stage=reference"):
        stages_for(load_config(None, [f"output_dir={out}", "stage=stage2"])).check()
    with pytest.raises(ConfigError, match=r"key 'paths.export_from': 'reference' is not one of stage1, stage2"):
        stages_for(load_config(None, [f"output_dir={out}", "stage=export", "paths.export_from=reference"])).check()
    # stage 2 and its reference scores read the decoder as the stage-1 export was trained to (decoder BOS)
    export = os.path.join(out, "stage1", "model")
    meta = ExportMeta(num_embed_tokens=5, max_text_len=64, instruction="i", decoder_bos=False)
    open(os.path.join(export, META_FILE), "w").write(json.dumps(dataclasses.asdict(meta)))
    online = [f"output_dir={out}", "stage=stage2", "reference.source=online", "model.lora_rank=4"]
    with pytest.raises(ConfigError, match=r"key 'model.decoder_bos': the stage-1 model .*stage1/model was trained "
                                          r"with model.decoder_bos=false; set it the same here"):
        stages_for(load_config(None, online)).check()
    stages_for(load_config(None, [*online, "model.decoder_bos=false"])).check()
    stages_for(load_config(None, [f"output_dir={out}", "stage=mine", "mine.enabled=true"])).check()  # the encoder alone
    # eval alone scores the untrained base beside the export (a pipeline's stage 1 builds the tiny one)
    evaluation = [f"output_dir={out}", "stage=eval", "paths.export_from=stage1"]
    with pytest.raises(ConfigError, match=r"key 'model.base \(the floor of eval.compare_base\)': no such file "
                                          r"or folder .*run/base"):
        stages_for(load_config(None, evaluation)).check()
    stages_for(load_config(None, [*evaluation, "eval.compare_base=false"])).check()
    # a bad row of the user's stage-2 file is named at the pipeline's start, though stage 2 reads mined copies
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(NLI).readline() + '{"query": "q", "pos": "p", "instruction": "i"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'neg'"):
        stages_for(load_config(None, [f"output_dir={out}", "mine.enabled=true", f"data.stage2={bad}"])).check()


@pytest.mark.distributed
@pytest.mark.usefixtures("default_tiny_base")
def test_a_pipeline_with_the_mining_stage_trains_stage2_on_mined_negatives(tmp_path):
    """stage1 -> mine -> reference -> stage2 -> eval through train.py (with a pooling of e_1..e_4): every row's negatives are
    other passages of its file, never its query or positive; reference scores cover exactly the
    mined rows stage 2 trains on."""
    from autoregembed.ground.data import read_lines
    from autoregembed.run.refscores import ReferenceScores

    out = str(tmp_path / "run")
    sets = ["stage1.max_steps=3", "stage1.micro_batch_size=4", "stage2.max_steps=2", "stage2.micro_batch_size=4",
            "model.match_decoder_scale=false", "mine.enabled=true", "mine.negatives=2", "eval.pooling=all_but_last",
            f"eval.sts_file={ROOT}/autoregembed/resources/sts_dev_sample.csv", "monitor.plot=false",
            f"model.base={TINY_BASE['path']}", f"output_dir={out}"]
    r = run_train(sets)
    assert r.returncode == 0, r.stderr[-3000:]
    mined = [json.loads(line) for line in read_lines(os.path.join(out, "mine", "0-nli_sample.jsonl"))]
    source = [json.loads(line) for line in read_lines(NLI)]
    corpus = {t for row in source for t in [row["pos"], *([row["neg"]] if isinstance(row["neg"], str) else row["neg"])]}
    assert len(mined) == len(source)
    assert all(len(m["neg"]) == 2 and set(m["neg"]) <= corpus and not {m["query"], m["pos"]} & set(m["neg"])
               for m in mined)
    assert [(m["query"], m["pos"]) for m in mined] == [(s["query"], s["pos"]) for s in source]
    assert sum(m["neg"] != ([s["neg"]] if isinstance(s["neg"], str) else s["neg"]) for m, s in zip(mined, source))
    refs = ReferenceScores(os.path.join(out, "reference", "scores.safetensors"))
    refs.check_all(mined, "mined rows")  # the scores are the mined rows', looked up by content
    assert len(refs) == len(mined)
    for stage in ("stage1", "stage2"):  # every export pools what eval.pooling names (mining read stage 1's so)
        assert json.load(open(os.path.join(out, stage, "model", "autoregembed.json")))["pooled"] == [1, 2, 3, 4]
    assert "mine: 256 of 256 rows" in r.stderr + r.stdout
    # resumed when it is all done: the mined rows and their scores are kept, not made again
    before = {p: open(p, "rb").read() for p in (os.path.join(out, "mine", "0-nli_sample.jsonl"),
                                                os.path.join(out, "reference", "scores.safetensors"))}
    r = run_train(sets, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr + r.stdout
    assert "0-nli_sample.jsonl was mined from these rows with this model and settings; kept" in log
    assert "already scores all 256 rows with this stage-1 model; kept" in log
    assert {p: open(p, "rb").read() for p in before} == before


COUNT_ENCODED = """
import os
from autoregembed.release.encoder import Encoder
real = Encoder.encode
def counted(self, texts, *a, **kw):
    with open(os.path.join({out!r}, "encoded-" + os.environ["RANK"]), "a") as f:
        f.write(str(len(texts)) + "\\n")
    return real(self, texts, *a, **kw)
Encoder.encode = counted
"""
STOP_WHILE_ENCODING = """
import os
from autoregembed.release.encoder import Encoder
real = Encoder.encode
def encode_then_stop(self, texts, *a, **kw):
    out = real(self, texts, *a, **kw)
    os.makedirs({stage_dir!r}, exist_ok=True)
    open(os.path.join({stage_dir!r}, "STOP"), "w").close()  # asked while the corpus was encoded
    return out
Encoder.encode = encode_then_stop
"""


@pytest.mark.distributed
def test_the_mine_stage_encodes_on_every_rank_and_writes_what_one_rank_writes(tmp_path, tiny_base, tiny_export):
    """stage=mine on 2 ranks: each encodes its share of the texts, rank 0 gathers them in order and mines the
    file one rank mines, byte for byte; a stop asked during the encoding stops every rank before the
    next chunk (PREEMPTED, no file), and the requeued run mines the same file."""
    from helpers import patched_train

    from autoregembed.run.preemption import EXIT_STOPPED

    def mine(out, ranks=None, script=os.path.join(ROOT, "train.py"), *extra):
        sets = ["stage=mine", "mine.enabled=true", "mine.negatives=3", "mine.max_similarity=0.999",
                f"paths.stage1_model={tiny_export}",
                f"model.base={tiny_base}", f"output_dir={out}"]
        return run_child([script, *[a for kv in sets for a in ("--set", kv)], *extra], ranks=ranks, timeout=600)

    mined = os.path.join("mine", "0-nli_sample.jsonl")
    r = mine(tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    one = open(tmp_path / "one" / mined, "rb").read()
    two = tmp_path / "two"
    os.makedirs(two)
    r = mine(two, 2, patched_train(tmp_path, COUNT_ENCODED.format(out=str(two))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(two / mined, "rb").read() == one and one.count(b"\n") == 256
    encoded = [sum(map(int, open(two / f"encoded-{rank}").read().split())) for rank in (0, 1)]
    assert abs(encoded[0] - encoded[1]) <= 3 and encoded[0] > 256  # each rank its half: corpus, queries, positives
    out = tmp_path / "stopped"
    r = mine(out, 2, patched_train(tmp_path, STOP_WHILE_ENCODING.format(stage_dir=str(out / "mine"))))
    assert f"(exitcode: {EXIT_STOPPED})" in r.stderr, r.stderr[-3000:]  # the launcher's own status is 1
    assert "mine: stop requested; exiting for requeue" in r.stdout + r.stderr
    assert open(out / "mine" / "PREEMPTED").read() == "mine" and not (out / mined).exists()
    r = mine(out, 2, os.path.join(ROOT, "train.py"), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(out / mined, "rb").read() == one


@pytest.mark.distributed
@pytest.mark.usefixtures("default_tiny_base")
def test_the_contrastive_baseline_trains_through_train_py_with_no_reference_stage(tmp_path):
    """loss.kind=infonce: stage 1, then stage 2 by InfoNCE (no reference scores, none scored), the
    export and its eval, as users run AutoRegEmbed; the run's record says which objective trained it."""
    out = str(tmp_path / "run")
    sets = ["stage1.max_steps=2", "stage1.micro_batch_size=4", "stage2.max_steps=3", "stage2.micro_batch_size=4",
            "loss.kind=infonce", "loss.temperature=0.05", "model.match_decoder_scale=false", "monitor.plot=false",
            f"eval.sts_file={ROOT}/autoregembed/resources/sts_dev_sample.csv", "eval.retrieval=none",
            f"model.base={TINY_BASE['path']}", f"output_dir={out}"]
    r = run_train(sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "reference")) and "reference:" not in r.stderr + r.stdout
    skipped = "its objective reads embeddings only; the frozen decoder is not loaded"
    assert f"stage2: {skipped}" in r.stdout and f"stage1: {skipped}" not in r.stdout  # no 13.5 GB at 7B for nothing
    with open(os.path.join(out, "stage2", "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    card = open(os.path.join(out, "stage2", "model", "README.md")).read()
    assert "infonce" in card and "temperature" in card, card[:3000]


def test_each_source_is_read_once_at_the_start(monkeypatch):
    """Reference scoring and stage 2 read the same stage-2 rows: validated once, not twice."""
    import autoregembed.run.stages as stages

    reads, load = [], stages.load_sources
    monkeypatch.setattr(stages, "load_sources", lambda sources, stage: reads.append(stage) or load(sources, stage=stage))
    stages_for(load_config(None)).check()
    assert reads == [1, 2]
