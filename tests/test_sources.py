"""Several datasets per stage: files, Parquet folders, save_to_disk folders and hub names, with
column mappings, default instructions and weights; the sampler's shares are pinned."""
import json
import re
import os
from collections import Counter

import numpy as np
import pytest
import yaml
from helpers import ROOT, run_child

from autoregembed.run.config import ConfigError, SourceConfig, load_config
from autoregembed.ground.data import DataError, MixtureSampler, StepSampler, load_rows, load_sources, sampler_for

TRIPLET = {"anchor": "a cat sits", "positive": "a cat is sitting", "negative": "a dog runs"}


def _source_of(sizes, index):
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def test_weighted_shares_are_exact_per_epoch_and_a_pure_function_of_the_step():
    sizes, weights = (10, 40, 50), (1.0, 1.0, 2.0)
    s = MixtureSampler(sizes, weights, micro_batch_size=4, grad_accum=1, world_size=2, seed=3)
    assert s.quotas == (25, 25, 50)
    steps = 10 * 100 // s.global_batch  # ten epochs
    drawn = [i for step in range(steps) for rank in range(2) for i in s.indices(step, 0, rank)]
    per_source = Counter(_source_of(sizes, i) for i in drawn)
    assert [per_source[k] for k in range(3)] == [250, 250, 500]
    counts = Counter(drawn)
    assert {counts[i] for i in range(10)} == {25}  # the small source is cycled evenly, 2.5 times an epoch
    again = MixtureSampler(sizes, weights, 4, 1, 2, 3)  # resuming: the same rows at the same step
    assert again.indices(77, 0, 1) == s.indices(77, 0, 1)
    assert MixtureSampler(sizes, weights, 4, 1, 2, 4).indices(0, 0, 0) != s.indices(0, 0, 0)


def test_same_source_batches_hold_one_source_each_in_its_share():
    sizes = (10, 40, 50)
    s = MixtureSampler(sizes, None, micro_batch_size=4, grad_accum=2, world_size=1, seed=0, same_source=True)
    assert s.quotas == (12, 40, 52)  # sizes, rounded up to whole micro-batches
    per_source = Counter()
    for step in range(13 * 3):  # three epochs of 104 rows, 8 rows a step
        for micro in range(2):
            batch = {_source_of(sizes, i) for i in s.indices(step, micro, 0)}
            assert len(batch) == 1
            per_source[batch.pop()] += 1
    assert [per_source[k] for k in range(3)] == [9, 30, 39]


@pytest.mark.parametrize("steps", [1, 7, 40, 123])
def test_realised_shares_count_every_row_the_steps_read(steps):
    """Against counting every rank's every micro-batch by hand: whole epochs hold the quotas, the last
    partial one is what it is."""
    from autoregembed.ground.data import realised_shares

    s = MixtureSampler((10, 30, 5), (1.0, 1.0, 2.0), micro_batch_size=3, grad_accum=2, world_size=2, seed=7)
    rows = [i for step in range(steps) for m in range(2) for r in range(2) for i in s.indices(step, m, r)]
    want = np.bincount(np.searchsorted(np.cumsum(s.sizes), rows, side="right"), minlength=3) / len(rows)
    np.testing.assert_allclose(realised_shares(s, steps), want)
    assert realised_shares(StepSampler(10, 2, 1, 1, 0), steps) == [1.0]


def test_one_source_keeps_the_step_samplers_order():
    assert isinstance(sampler_for((37,), None, 4, 2, 2, 5), StepSampler)
    assert isinstance(sampler_for((37,), None, 4, 2, 2, 5, same_source=True), MixtureSampler)


def test_files_parquet_folders_and_save_to_disk_folders_with_column_mappings(tmp_path):
    import datasets

    rows = [dict(TRIPLET, anchor=f"query {i}") for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "parquet"
    shards.mkdir()
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(shards / "part-0.parquet"))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(shards / "part-1.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    columns = {"query": "anchor", "pos": "positive", "neg": "negative"}
    want = [{"query": f"query {i}", "pos": "a cat is sitting", "neg": ["a dog runs"], "instruction": "Find it."}
            for i in range(5)]
    for path in ("a.jsonl", "parquet", "saved"):
        got = load_rows(SourceConfig(path=str(tmp_path / path), columns=columns, instruction="Find it."), stage=2)
        assert got == want, path
    with pytest.raises(DataError, match=r"a.jsonl:1: missing column 'question' \(mapped to 'query'"):
        load_rows(SourceConfig(path=str(tmp_path / "a.jsonl"), columns={"query": "question"}), stage=2)
    with pytest.raises(DataError, match="missing field 'instruction'"):  # no default: the rows must carry one
        load_rows(SourceConfig(path=str(tmp_path / "a.jsonl"), columns=columns), stage=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no dataset in it"):
        load_rows(str(tmp_path / "empty"), stage=2)
    mixed = load_sources([SourceConfig(path=str(tmp_path / "a.jsonl"), columns=columns, instruction="x"),
                          SourceConfig(path=str(tmp_path / "saved"), columns=columns, instruction="y")], stage=2)
    assert len(mixed) == 10 and mixed.sizes == (5, 5)


def test_sources_in_the_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"stage2": [
        {"path": "~/a.jsonl", "weight": 2},
        {"path": str(tmp_path / "b"), "weight": 1, "columns": {"query": "anchor"}, "instruction": "Find it."}]}}))
    cfg = load_config(str(path))
    a, b = cfg.sources(2)
    assert a.path == os.path.expanduser("~/a.jsonl") and a.weight == 2.0 and b.columns == {"query": "anchor"}
    assert [s.path for s in load_config(None, ["data.stage1=x.jsonl,y.jsonl"]).sources(1)] == ["x.jsonl", "y.jsonl"]
    for sources, pattern in (([{"path": "a", "colums": {}}], r"unknown key 'data.stage2\[0\].colums'"),
                             ([{"path": "a", "weight": 1}, {"path": "b"}], "give every source a weight or none"),
                             ([{"path": "a", "columns": {"negative": "n"}}], r"data.stage2\[0\].columns': negative is not"),
                             ([{"path": "a", "weight": 0}], r"data.stage2\[0\].weight' must be a finite number > 0"),
                             ([{"weight": 1}], r"data.stage2\[0\].path' is missing"),
                             ({"path": "a"}, "key 'data.stage2': expected")):
        path.write_text(yaml.safe_dump({"data": {"stage2": sources}}))
        with pytest.raises(ConfigError, match=pattern):
            load_config(str(path))


def test_a_stage2_run_trains_from_three_sources_and_data_check_reports_each(tmp_path, tiny_base, tiny_export, capsys):
    import datasets

    from autoregembed.tools.cli import main

    rows = [dict(TRIPLET, anchor=f"a cat number {i} sits") for i in range(8)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"query": r["anchor"], "pos": r["positive"],
                                                          "neg": r["negative"], "instruction": "Find it."}) + "\n"
                                              for r in rows))
    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    columns = {"query": "anchor", "pos": "positive", "neg": "negative"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "stage2", "output_dir": str(tmp_path / "run"),
        "paths": {"stage1_model": tiny_export}, "reference": {"source": "online"},
        "model": {"base": tiny_base, "lora_rank": 4, "decoder_bos": False},  # as tiny_export's meta says
        "stage2": {"max_steps": 3, "micro_batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-3},
        "data": {"same_source_batches": True, "stage2": [
            {"path": str(tmp_path / "a.jsonl"), "weight": 1},
            {"path": str(tmp_path / "parquet"), "weight": 1, "columns": columns, "instruction": "Find it."},
            {"path": str(tmp_path / "saved"), "weight": 2, "columns": columns, "instruction": "Find it."}]}}))
    assert main(["data", "check", "--stage", "2", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(os.path.basename(r["file"]), r["rows"], r["errors"]) for r in report["sources"]] == [
        ("a.jsonl", 8, 0), ("parquet", 8, 0), ("saved", 8, 0)]
    # weights 1:1:2 over 24 rows -> quotas 8/8/12 rounded up to whole micro-batches of 4 (same_source): 8/8/12;
    # 3 steps of 4 rows read 12 rows of the first epoch, whose micro-batches come in a shuffled order
    shares = re.findall(r"(\S+) \(8 rows\) ([\d.]+)% configured, ([\d.]+)% read", report["mixture"])
    assert [(name, float(conf)) for name, conf, _ in shares] == [("a.jsonl", 25.0), ("parquet", 25.0), ("saved", 50.0)]
    assert sum(float(read) for *_, read in shares) == pytest.approx(100.0, abs=0.2)
    proc = run_child([os.path.join(ROOT, "train.py"), "--config", str(config)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"stage2: sources: {report['mixture']}" in proc.stdout  # the run log says the same
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "stage2" / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    card = open(tmp_path / "run" / "stage2" / "model" / "README.md").read()
    assert "- data: `a.jsonl`, `parquet`, `saved`" in card


def test_a_document_instruction_encodes_the_positive_and_is_optional(tmp_path, tiny_export):
    """Rows (or a source's default) may give the positive its own instruction: stage 2 encodes the
    positive with it (c_p) and the query with ``instruction``; reference keys do not change."""
    import torch
    from transformers import AutoTokenizer

    from autoregembed.method.batches import alignment_batch
    from autoregembed.ground.data import row_key
    from autoregembed.method.tokenization import TextEncoder, prepare_tokenizer

    path = tmp_path / "rows.jsonl"
    rows = [{"query": "a cat sits", "pos": "a cat is sitting", "neg": "a dog runs", "instruction": "Q."},
            {"query": "rain falls", "pos": "it rains", "neg": ["sun shines"], "instruction": "Q.",
             "document_instruction": "Own."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(SourceConfig(path=str(path), document_instruction="Doc."), stage=2)
    assert [r.get("document_instruction") for r in loaded] == ["Doc.", "Own."]
    assert "document_instruction" not in load_rows(str(path), stage=2)[0]
    assert row_key(loaded[0]) == row_key(load_rows(str(path), stage=2)[0])

    te = TextEncoder(prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_export), 5), 5)
    batch = alignment_batch(loaded, te, None)
    want = te.encode_inputs([r["pos"] for r in rows], ["Doc.", "Own."])
    assert torch.equal(batch.p_input_ids, want["input_ids"])
    assert torch.equal(batch.candidates.q_input_ids, te.encode_inputs([r["query"] for r in rows], ["Q.", "Q."])["input_ids"])
    path.write_text(json.dumps({**rows[0], "document_instruction": 3}) + "\n")
    with pytest.raises(DataError, match="document_instruction"):
        load_rows(str(path), stage=2)
