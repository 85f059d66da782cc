"""Retrieval evaluation (release/retrieval.py): metrics against values computed by hand, the BEIR and
stage-2-row readers, and errors that name the file and line."""
import json
import math

import numpy as np
import pytest

from autoregembed.release.retrieval import RetrievalSet, from_rows, metrics, read_beir, retrieval_eval
from autoregembed.ground.errors import InputError


def test_ndcg_mrr_and_recall_against_a_hand_computation():
    # q1: relevant d2 (grade 2) and d4 (grade 1); ranking d1, d2, d3, d4 -> hits at ranks 2 and 4
    # q2: relevant d1 only, ranked first; q3: no judgments (left out)
    docs = ["d1", "d2", "d3", "d4"]
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0]])
    qrels = {"q1": {"d2": 2, "d4": 1}, "q2": {"d1": 1}}
    m = metrics(scores, ["q1", "q2", "q3"], docs, qrels, k=3, recall_at=3)
    dcg1 = 2 / math.log2(3)  # d2 at rank 2; d4 at rank 4 is past k=3
    idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx((dcg1 / idcg1 + 1.0) / 2)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 / 2 + 1) / 2)  # q1 finds d2 of {d2, d4} in its top 3
    assert m["queries"] == 2
    tied = metrics(np.array([[0.5, 0.5]]), ["q"], ["a", "b"], {"q": {"b": 1}}, k=10, recall_at=100)
    assert tied["mrr@10"] == 0.5  # ties keep corpus order, as a stable sort does
    with pytest.raises(InputError, match="no query has a relevant document"):
        metrics(scores, ["q3"], docs, qrels)


def test_beir_folder_and_stage2_rows_read_into_the_same_task(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "1", "title": "Wings", "text": "lift and drag"}) + "\n" +
                                           json.dumps({"_id": "2", "title": "", "text": "boundary layers"}) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "7", "text": "what makes lift?"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n7\t1\t2\n7\t2\t0\n7\t99\t1\n")
    s = read_beir(str(tmp_path))
    assert s.corpus == {"1": "Wings lift and drag", "2": "boundary layers"} and s.queries == {"7": "what makes lift?"}
    assert s.qrels == {"7": {"1": 2}}  # grade 0 and documents outside the corpus are no judgments
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n7\t1\tvery\n")
    with pytest.raises(InputError, match=r"qrels/test.tsv:2: expected query-id, corpus-id, score"):
        read_beir(str(tmp_path))
    with pytest.raises(InputError, match="qrels: no corpus.jsonl .a BEIR folder holds"):
        read_beir(str(tmp_path / "qrels"))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "7", "text": "lift?"}) + "\n" + json.dumps({"text": "x"}))
    with pytest.raises(InputError, match=r"queries.jsonl:2: a BEIR record needs '_id' and a text field 'text'"):
        read_beir(str(tmp_path))
    rows = [{"query": "a", "pos": "b", "neg": "c"}, {"query": "d", "pos": "c", "neg": ["b", "e"]}]
    t = from_rows("pairs", rows)
    assert t.queries == {"q0": "a", "q1": "d"} and sorted(t.corpus.values()) == ["b", "c", "e"]
    assert {q: t.corpus[d] for q, rel in t.qrels.items() for d in rel} == {"q0": "b", "q1": "c"}


class _Lexical:
    """An embedder by letters: enough to check that queries and documents go through their own sides."""

    def __init__(self):
        self.calls = []

    def _embed(self, texts, side):
        self.calls.append(side)
        v = np.array([[t.count(c) for c in "abcdefgh"] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_query(self, texts, **kw):
        return self._embed(texts, "query")

    def encode_document(self, texts, **kw):
        return self._embed(texts, "document")


def test_retrieval_eval_encodes_each_side_with_its_own_instruction():
    enc = _Lexical()
    data = RetrievalSet("toy", {"q": "abab"}, {"x": "ghgh", "y": "aabb", "z": "cdcd"}, {"q": {"y": 1}})
    m = retrieval_eval(enc, data)
    assert enc.calls == ["query", "document"] and m["mrr@10"] == 1.0 and m["ndcg@10"] == 1.0


def test_eval_retrieval_on_the_cli_scores_the_export_and_its_floor_and_refuses_bad_lines(tiny_base, tiny_export,
                                                                                        tmp_path):
    """``autoregembed eval --retrieval`` prints the export's metrics (queries and documents through its
    own instructions) and, with --base, the untrained base's read the same way; a bad row fails with
    its file and line before any model loads."""
    from helpers import run_child

    from autoregembed.release.encoder import Encoder
    from autoregembed.run.config import load_config

    heldout = load_config(None, []).eval.retrieval_path
    r = run_child(["-m", "autoregembed.tools.cli", "eval", "--model", tiny_export, "--retrieval", heldout,
                   "--base", tiny_base])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    want = retrieval_eval(Encoder.from_pretrained(tiny_export), from_rows("x", [json.loads(line) for line in open(heldout)]))
    assert out["retrieval"]["ndcg@10"] == round(want["ndcg@10"], 4) and out["retrieval"]["queries"] == 256
    assert 0 < out["base_retrieval"]["mrr@10"] <= 1 and out["base_retrieval"]["set"] == heldout
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"query": "a", "pos": "b"}) + "\n" + json.dumps({"query": "c"}) + "\n")
    r = run_child(["-m", "autoregembed.tools.cli", "eval", "--model", tiny_export, "--retrieval", bad])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:2: a retrieval row needs text fields 'query' and 'pos'" in r.stderr


WATCH_EVALS = """
import json
from autoregembed.run import trainer
from autoregembed.run.diagnostics import reading_as_export
SCORES, LOG = [0.1, 0.5, 0.3, 0.2], {log!r}
def scored(engine, text_encoder, instruction, prompts, data, batch_size):
    with reading_as_export(engine, text_encoder, instruction, prompts) as encoder:
        probe = encoder.encode(["a man plays a guitar on the stage"])[0].tolist()
    done = json.load(open(LOG)) if __import__("os").path.exists(LOG) else []
    json.dump(done + [probe], open(LOG, "w"))
    return {{"retrieval_ndcg@10": SCORES[len(done)]}}
trainer.retrieval_during_training = scored
"""


@pytest.mark.distributed
def test_keep_best_exports_the_model_of_the_best_evaluation_not_the_last(default_tiny_base, tmp_path):
    """eval.keep_best=ndcg@10 with a metric that peaks mid-run (evaluations at steps 2, 4, 6, 8 scoring
    0.1, 0.5, 0.3, 0.2): the stage's export embeds as the model did at step 4, its card says so, and
    best.json holds the step for a resumed run."""
    from helpers import ROOT, patched_train, run_child

    from autoregembed.release.encoder import Encoder
    from autoregembed.release.meta import ExportMeta

    out, log = tmp_path / "run", tmp_path / "evals.json"
    sets = ["stage=stage1", f"model.base={default_tiny_base}", f"output_dir={out}", "stage1.max_steps=8",
            "stage1.micro_batch_size=4", "stage1.warmup_steps=0", "model.match_decoder_scale=false",
            "eval.every=2", "eval.keep_best=ndcg@10"]
    r = run_child([patched_train(tmp_path, WATCH_EVALS.format(log=str(log))), *[a for s in sets for a in ("--set", s)]])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept the export of step 4 of 8: retrieval_ndcg@10 0.5000, the best of eval.every's" in r.stdout
    probes = np.array(json.load(open(log)))
    assert len(probes) == 4 and not np.allclose(probes[1], probes[3], atol=1e-4)  # the model moved after step 4
    export = str(out / "stage1" / "model")
    np.testing.assert_allclose(Encoder.from_pretrained(export).encode(["a man plays a guitar on the stage"])[0],
                               probes[1], atol=1e-5)
    assert ExportMeta.read(export).training["kept"] == "step 4 of 8: retrieval_ndcg@10 0.5000, the best of eval.every's"
    assert json.load(open(out / "stage1" / "best.json")) == {"metric": "retrieval_ndcg@10", "value": 0.5, "step": 4}
    records = [json.loads(line) for line in open(out / "stage1" / "metrics.jsonl")]
    assert [r.get("retrieval_ndcg@10") for r in records if "retrieval_ndcg@10" in r] == [0.1, 0.5, 0.3, 0.2]


def test_keep_best_needs_evaluations_to_compare():
    from autoregembed.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'eval.keep_best' compares the evaluations of eval.every, which is 0"):
        load_config(None, ["eval.keep_best=ndcg@10"])
    with pytest.raises(ConfigError, match="'eval.keep_best': 'ndcg' is not one of ndcg@10, mrr@10, recall@100, sts"):
        load_config(None, ["eval.keep_best=ndcg", "eval.every=5"])
    with pytest.raises(ConfigError, match="a retrieval metric, but eval.retrieval is none"):
        load_config(None, ["eval.keep_best=mrr@10", "eval.every=5", "eval.retrieval=none"])
    assert load_config(None, ["eval.keep_best=sts", "eval.every=5", "eval.retrieval=none"]).eval.keep_best_key == \
        "sts_spearman"


def test_the_runs_verdict_reads_retrieval_when_there_is_a_set_and_sts_beside_it():
    """The warning follows the run's own evaluation (retrieval nDCG@10 when there is a set, else STS);
    the other figure's move is printed beside it, signed."""
    from autoregembed.run.evaluation import _verdict

    ir = lambda x: {"ndcg@10": x}  # noqa: E731
    up_ir_down_sts = {"spearman_x100": 32.5, "base_spearman_x100": 38.1, "retrieval": ir(0.205),
                      "base_retrieval": ir(0.184)}
    assert _verdict(up_ir_down_sts) == ("the training moved retrieval nDCG@10 by +0.0210, STS by -5.60 from the "
                                        "untrained base")
    down_ir = {**up_ir_down_sts, "retrieval": ir(0.15)}
    assert _verdict(down_ir).endswith("; WARNING: retrieval nDCG@10 below the untrained base, the training made "
                                      "the embedding worse")
    assert _verdict({"spearman_x100": 32.5, "base_spearman_x100": 38.1}) == (
        "the training moved STS by -5.60 from the untrained base; WARNING: STS below the untrained base, the "
        "training made the embedding worse")
    assert "WARNING" not in _verdict({"spearman_x100": 40.0, "base_spearman_x100": 38.1})
    fell = {"spearman_x100": 65.64, "stage1_spearman_x100": 70.55, "retrieval": ir(0.2011),
            "stage1_retrieval": ir(0.2163)}
    assert _verdict(fell, "stage1") == ("stage 2 moved retrieval nDCG@10 by -0.0152, STS by -4.91 from its stage-1 "
                                        "start; WARNING: retrieval nDCG@10 and STS below its stage-1 start, stage 2 "
                                        "made the embedding worse")  # seed 2 of the benchmark's (d)
    traded = {**fell, "spearman_x100": 72.0}  # against the start, one figure down is not a warning
    assert _verdict(traded, "stage1") == ("stage 2 moved retrieval nDCG@10 by -0.0152, STS by +1.45 from its stage-1 "
                                          "start")
    assert "WARNING: STS below" in _verdict({"spearman_x100": 65.64, "stage1_spearman_x100": 70.55}, "stage1")
    # with the paired intervals (paired.intervals): each move carries one, and a fall whose interval
    # reaches 0 is said to be within the evaluation's noise
    spans = {"retrieval": [-0.041, 0.012], "sts": [-6.2, -3.6]}
    assert _verdict(fell, "stage1", spans) == (
        "stage 2 moved retrieval nDCG@10 by -0.0152 (95% interval -0.0410 to +0.0120), STS by -4.91 (95% interval "
        "-6.20 to -3.60) from its stage-1 start; WARNING: retrieval nDCG@10 and STS below its stage-1 start, stage 2 "
        "made the embedding worse (within the evaluation's noise for retrieval nDCG@10: the interval reaches 0)")
    assert _verdict(down_ir, "base", {"sts": [-7.0, -4.0]}).endswith("the training made the embedding worse")
