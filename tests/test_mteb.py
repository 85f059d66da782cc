"""MTEB 2 through our wrapper: the same Spearman as ``autoregembed eval --sts``, and instructions by task type."""
import json
import os
import types

import pytest

from autoregembed.cli import main
from autoregembed.config import RESOURCES

STS = os.path.join(RESOURCES, "sts_dev_sample.csv")


def test_mteb_on_a_local_sts_task_equals_eval_sts(tiny_export, tmp_path, capsys):
    out = str(tmp_path / "mteb")
    assert main(["eval", "--model", tiny_export, "--mteb", STS, "--output", out]) == 0
    mteb_score = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["main_score_x100"]
    assert main(["eval", "--model", tiny_export, "--sts", STS]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["spearman_x100"]
    (name, score), = mteb_score.items()
    assert score == pytest.approx(ours, abs=0.0101)  # each rounded to 2 decimals: equal values may differ by 0.01
    result_files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f == f"{name}.json"]
    assert len(result_files) == 1  # mteb's own result file, under the model's name
    record = json.load(open(result_files[0]))
    assert record["scores"]["test"][0]["main_score"] * 100 == pytest.approx(score, abs=0.006)


def test_instruction_is_chosen_by_task_then_type_then_the_exports_own(tiny_export):
    from mteb.types import PromptType

    from autoregembed.mteb_model import AutoRegEmbedMTEB

    model = AutoRegEmbedMTEB(tiny_export, instructions={"STS12": "task", "Retrieval-document": "passage"})
    task = lambda name, type_: types.SimpleNamespace(name=name, type=type_)
    assert model.instruction_for(task("STS12", "STS")) == "task"
    assert model.instruction_for(task("STS13", "STS")) == "Retrieve semantically similar text."
    assert model.instruction_for(task("NFCorpus", "Retrieval"), PromptType.query).startswith("Given a query")
    assert model.instruction_for(task("NFCorpus", "Retrieval"), PromptType.document) == "passage"
    assert model.instruction_for(task("X", "Unknown")) == model.export_meta.instruction
    assert model.mteb_model_meta.embed_dim == 32 and model.mteb_model_meta.similarity_fn_name.value == "cosine"


def test_unknown_mteb_task_is_one_line_before_the_model_loads(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--mteb", "NoSuchTask"]) == 2
    assert "no MTEB task named 'NoSuchTask'" in capsys.readouterr().err
