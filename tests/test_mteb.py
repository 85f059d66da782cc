"""MTEB 2 through our wrapper: the same Spearman as ``autoregembed eval --sts``, and instructions by task type."""
import json
import os
import types

import pytest

from autoregembed.tools.cli import main
from autoregembed.run.config import RESOURCES

STS = os.path.join(RESOURCES, "sts_dev_sample.csv")


def test_mteb_on_a_local_sts_task_equals_eval_sts(tiny_export, tmp_path, capsys):
    out = str(tmp_path / "mteb")
    assert main(["eval", "--model", tiny_export, "--mteb", STS, "--output", out]) == 0
    mteb_score = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["main_score_x100"]
    assert main(["eval", "--model", tiny_export, "--sts", STS]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["spearman_x100"]
    (name, score), = mteb_score.items()
    # MTEB's cosines are float32, ours float64: on the tiny model near-equal similarities can swap ranks, and
    # which ones do depends on the thread count (43.48 vs 43.50 at one thread); a wrong instruction or
    # pooling moves the score by points
    assert score == pytest.approx(ours, abs=0.05)
    result_files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f == f"{name}.json"]
    assert len(result_files) == 1  # mteb's own result file, under the model's name
    record = json.load(open(result_files[0]))
    assert record["scores"]["test"][0]["main_score"] * 100 == pytest.approx(score, abs=0.006)


def test_instruction_is_chosen_by_task_then_type_then_the_exports_own(tiny_export):
    from mteb.types import PromptType

    from autoregembed.release.mteb_model import AutoRegEmbedMTEB

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


def test_model_meta_is_complete_and_read_from_the_base_models_card(tiny_export, tmp_path):
    import datetime
    import json
    import shutil

    from autoregembed.release.meta import META_FILE
    from autoregembed.release.mteb_model import AutoRegEmbedMTEB

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n")
    model_dir = tmp_path / "run" / "stage2" / "model"
    shutil.copytree(tiny_export, model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    (model_dir / META_FILE).write_text(json.dumps({**meta, "base_model": str(base),
                                                   "training": {"data": ["/d/nli.jsonl", "/d/msmarco"]}}))
    m = AutoRegEmbedMTEB(str(model_dir)).mteb_model_meta
    assert m.name == "autoregembed/run-stage2-model" and m.license == "apache-2.0" and m.languages == ["eng-Latn"]
    assert m.release_date == datetime.date.today().isoformat() and m.training_datasets == {"nli.jsonl", "msmarco"}
    assert m.memory_usage_mb == round(m.n_parameters * 4 / 2**20, 1) and m.adapted_from == str(base)
    described = ("release_date", "languages", "n_parameters", "n_embedding_parameters", "memory_usage_mb", "max_tokens",
                 "embed_dim", "license", "open_weights", "public_training_code", "public_training_data", "framework",
                 "similarity_fn_name", "use_instructions", "training_datasets", "adapted_from", "modalities")
    assert [k for k in described if getattr(m, k) is None] == []


def test_mteb_through_sentence_transformers_scores_as_our_wrapper(tiny_export, tmp_path):
    """The same local task, run by MTEB on SentenceTransformer(export) (MTEB's own wrapper, the export's
    prompts) and on AutoRegEmbedMTEB: the same Spearman, as reported (x100, two decimals)."""
    import mteb
    from mteb.cache import ResultCache
    from sentence_transformers import SentenceTransformer

    from autoregembed.release.mteb_model import AutoRegEmbedMTEB, local_sts_task

    scores = []
    for i, model in enumerate([SentenceTransformer(tiny_export, device="cpu"), AutoRegEmbedMTEB(tiny_export)]):
        result = mteb.evaluate(model, [local_sts_task(STS)], cache=ResultCache(str(tmp_path / str(i))),
                               overwrite_strategy="always", show_progress_bar=False)
        scores.append(result.task_results[0].get_score())
    # equal to 1e-4: MTEB takes sentence-transformers' float32 embeddings as they are, ours as float64
    # (AutoRegEmbedMTEB.encode), and the tiny model's near-equal cosines rank by rounding (4e-5 here)
    assert scores[0] == pytest.approx(scores[1], abs=1e-4), scores
