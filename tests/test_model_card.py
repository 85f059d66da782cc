"""Every export carries a model card that renders: Hub metadata, usage code that runs as written
and gives the model's embeddings, how it trained and what it scored."""
import os
import re
import shutil

import numpy as np
import pytest
import yaml

from autoregembed.release.model_card import CARD_FILE, EXAMPLE, base_license, write_model_card
from helpers import ROOT


def _front_matter_and_body(text):
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.mark.parametrize("export", ["tiny_export", "pooled_export"])
def test_the_card_renders_and_its_usage_code_embeds_as_the_encoder_does(export, request, tmp_path):
    import torch

    from autoregembed.release.encoder import Encoder

    model = tmp_path / "my-embedder"
    shutil.copytree(request.getfixturevalue(export), model)
    write_model_card(str(model))  # the copy's card names the copy's folder
    meta, body = _front_matter_and_body((model / CARD_FILE).read_text())
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["license"] == "other"  # the tiny base's card names none: no license is invented
    assert "# my-embedder" in body.splitlines()
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 3  # sentence-transformers, autoregembed, transformers
    want = Encoder.from_pretrained(str(model), device="cpu").encode(EXAMPLE)
    for code in blocks:
        scope = {}
        exec(compile(code, "card", "exec"), scope)  # as a reader would paste it
        got = scope["embeddings"]
        got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_license_and_language_are_read_from_the_base_models_own_card(tmp_path, tiny_export):
    import dataclasses

    from autoregembed.release.meta import ExportMeta
    from autoregembed.release.model_card import card_text

    (tmp_path / CARD_FILE).write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# base\n")
    assert base_license(str(tmp_path)) == "apache-2.0"
    meta = dataclasses.replace(ExportMeta.read(tiny_export), base_model=str(tmp_path))
    front = yaml.safe_load(card_text("org/model", meta).split("---\n")[1])
    assert front["language"] == "en" and front["license"] == "apache-2.0"  # the base's languages are the embedder's
    (tmp_path / CARD_FILE).write_text("# a card without metadata\n")
    assert base_license(str(tmp_path)) == "other"
    assert base_license(None) == "other"


def test_an_evaluation_rewrites_the_card_with_its_result(tiny_base, tiny_export, tmp_path):
    """The card and eval/result.json carry the export's STS and retrieval and its untrained base's
    (eval.compare_base), the floor as `autoregembed eval --base` computes it."""
    import json

    from autoregembed.release.evaluate import base_report
    from autoregembed.run.config import load_config
    from autoregembed.run.evaluation import evaluate

    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    assert "Not evaluated yet" in (model / CARD_FILE).read_text()
    sts = os.path.join(ROOT, "autoregembed", "resources", "sts_dev_sample.csv")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"eval.sts_file={sts}", f"model.base={tiny_base}"])
    result = evaluate(cfg.eval, cfg.layout, str(model))
    card = (model / CARD_FILE).read_text()
    assert f"| sts_dev_sample.csv | {result['spearman_x100']:.2f} | {result['mean_pairwise_cosine']:.3f} |" in card
    assert result["base_spearman_x100"] == base_report(tiny_base, str(model), sts)["base_spearman_x100"]
    assert f"untrained base `{tiny_base}` (mean of its EMBED states) | {result['base_spearman_x100']:.2f} |" in card
    assert json.load(open(tmp_path / "run" / "eval" / "result.json")) == result
    front = yaml.safe_load(card.split("---\n")[1])  # the Hub reads the results from the model-index
    (index,) = front["model-index"]
    assert index["results"][0] == {"task": {"type": "STS"}, "dataset": {"name": "sts_dev_sample.csv", "type": "sts"},
                                   "metrics": [{"type": "cos_sim_spearman", "value": result["spearman_x100"]}]}
    assert index["results"][1]["metrics"] == [{"type": t, "value": result["retrieval"][m]} for t, m in
                                              (("ndcg_at_10", "ndcg@10"), ("mrr_at_10", "mrr@10"),
                                               ("recall_at_100", "recall@100"))]
    assert "## Citation" in card and "deng-etal-2025-following" in card and "2025.emnlp-main.639" in card
    ir, floor = result["retrieval"], result["base_retrieval"]  # eval.retrieval=auto: the held-out bundled pairs
    assert ir["set"] == cfg.eval.retrieval_path and ir["queries"] == floor["queries"] == 256
    assert floor == base_report(tiny_base, str(model), None, retrieval=cfg.eval.retrieval_path)["base_retrieval"]
    assert (f"| nli_heldout.jsonl (256 queries), this model | {ir['ndcg@10']:.4f} | {ir['mrr@10']:.4f} | "
            f"{ir['recall@100']:.4f} |") in card
    assert f"| nli_heldout.jsonl (256 queries), the untrained base | {floor['ndcg@10']:.4f} |" in card
    (lo, hi), move = result["base_interval95"]["retrieval"], ir["ndcg@10"] - floor["ndcg@10"]
    assert lo <= round(move, 4) <= hi and set(result["base_interval95"]) == {"sts", "retrieval"}
    cfg = load_config(None, [f"output_dir={tmp_path / 'run2'}", f"eval.sts_file={sts}", f"model.base={tiny_base}",
                             "eval.compare_base=false", "eval.retrieval=none"])
    assert not {"base_spearman_x100", "retrieval", "base_retrieval"} & set(evaluate(cfg.eval, cfg.layout, str(model)))
    assert oct((model / CARD_FILE).stat().st_mode & 0o044) == oct(0o044)  # readable by the group and others


def test_a_stage_2_export_is_evaluated_beside_its_stage_1_start(tiny_base, tiny_export, tmp_path, capsys):
    """eval.compare_stage1: the pipeline's eval of stage 2 also scores the stage-1 export it started from,
    read the same way, and says how far stage 2 moved it (a warning when below); off, or without a start,
    nothing of it."""
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.evaluate import sts_report
    from autoregembed.run.config import load_config
    from autoregembed.run.evaluation import evaluate

    sts = os.path.join(ROOT, "autoregembed", "resources", "sts_dev_sample.csv")
    start = tmp_path / "stage1"
    shutil.copytree(tiny_export, start)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"eval.sts_file={sts}", f"model.base={tiny_base}",
                             "eval.compare_base=false", "eval.retrieval=none"])
    result = evaluate(cfg.eval, cfg.layout, tiny_export, str(start))
    want = sts_report(Encoder.from_pretrained(str(start)), str(start), sts, show_progress_bar=False)["spearman_x100"]
    assert result["stage1_model"] == str(start) and result["stage1_spearman_x100"] == want
    # the same weights: no move, and no interval around it (both models' cosines are the same per pair)
    assert "eval: stage 2 moved STS by +0.00 (95% interval +0.00 to +0.00) from its stage-1 start" in capsys.readouterr().out
    assert result["stage1_interval95"] == {"sts": [0.0, 0.0]}
    cfg = load_config(None, [f"output_dir={tmp_path / 'run2'}", f"eval.sts_file={sts}", f"model.base={tiny_base}",
                             "eval.compare_base=false", "eval.retrieval=none", "eval.compare_stage1=false"])
    assert not any(k.startswith("stage1_") for k in evaluate(cfg.eval, cfg.layout, tiny_export, str(start)))


@pytest.mark.parametrize("base,hub", [("HuggingFaceTB/SmolLM2-135M", True), ("/data/models/llama", False)])
def test_base_model_metadata_names_hub_ids_only(tiny_export, tmp_path, base, hub):
    import json

    from autoregembed.release.meta import META_FILE

    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    meta = json.loads((model / META_FILE).read_text())
    (model / META_FILE).write_text(json.dumps({**meta, "base_model": base,
                                               "training": {"stage": "stage2", "data": ["/d/nli.jsonl"], "steps": 7}}))
    front, body = _front_matter_and_body(open(write_model_card(str(model))).read())
    assert (front.get("base_model") == base) == hub and "datasets" not in front  # a local file is no Hub dataset
    assert "- steps: 7" in body and "- data: `nli.jsonl`" in body
