"""Stage 2 with in-batch negatives and online reference scores."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from autoregembed.method.batches import alignment_batch, candidate_batch, with_in_batch_negatives
from autoregembed.run.config import Config, ConfigError, load_config
from autoregembed.method.losses import alignment_loss
from autoregembed.ground.data import StepSampler
from autoregembed.run.stages import stages_for

ROWS = [{"query": f"query {i}", "pos": f"pos {i}", "neg": [f"neg {i}.{j}" for j in range(n)], "instruction": "I."}
        for i, n in enumerate([1, 3, 2, 1])]


def _hand_loss(rows, c_q, c_p, r_of, ref_c, ref_r_of, beta, tau, sign):
    """The paper's formula pair by pair, in plain Python over each query's candidate texts."""
    total = 0
    for i, row in enumerate(rows):
        s1 = torch.sigmoid(beta * (c_q[i] - c_p[i]).abs())
        pairs = []
        for text in row["neg"]:
            ref_margin = ref_c[i] - ref_r_of[(i, text)]
            margin = (c_q[i] - r_of[(i, text)]) + (ref_margin if sign == "code" else -ref_margin)
            pairs.append(torch.nn.functional.softplus((s1 - torch.sigmoid(beta * margin)) / tau))
        total = total + sum(pairs) / len(pairs)
    return total / len(rows)


def test_in_batch_candidates_are_own_negatives_then_every_other_text_once():
    got = with_in_batch_negatives(ROWS[:3])
    assert got[0]["neg"] == ["neg 0.0", "pos 1", "neg 1.0", "neg 1.1", "neg 1.2", "pos 2", "neg 2.0", "neg 2.1"]
    assert got[1]["neg"][:3] == ["neg 1.0", "neg 1.1", "neg 1.2"] and "pos 1" not in got[1]["neg"]
    shared = [{"query": "a", "pos": "x", "neg": ["y"], "instruction": "I."},
              {"query": "b", "pos": "y", "neg": ["x"], "instruction": "I."}]  # texts shared across rows
    assert [r["neg"] for r in with_in_batch_negatives(shared)] == [["y"], ["x"]]
    assert with_in_batch_negatives(ROWS[:1]) == ROWS[:1]  # one row: nothing to borrow
    assert [r["query"] for r in got] == ["query 0", "query 1", "query 2"]


@pytest.mark.parametrize("n_rows,sign", list(itertools.product([1, 2, 4], ["paper", "code"])))
def test_in_batch_loss_and_gradients_match_the_hand_reference(n_rows, sign):
    rows = with_in_batch_negatives(ROWS[:n_rows])
    owner = candidate_batch(rows, _IdsEncoder()).owner
    gen = torch.Generator().manual_seed(n_rows)
    c_q, c_p = (-20 * torch.rand(n_rows, generator=gen, dtype=torch.float64) for _ in range(2))
    r = -30 * torch.rand(len(owner), generator=gen, dtype=torch.float64)
    ref_c = -20 * torch.rand(n_rows, generator=gen, dtype=torch.float64)
    ref_r = -30 * torch.rand(len(owner), generator=gen, dtype=torch.float64)
    for t in (c_q, c_p, r):
        t.requires_grad_(True)
    got = alignment_loss(c_q, c_p, r, owner, ref_c, ref_r, beta=0.1, tau=0.1, reference_sign=sign)
    keys = [(i, t) for i, row in enumerate(rows) for t in row["neg"]]
    want = _hand_loss(rows, c_q, c_p, dict(zip(keys, r)), ref_c, dict(zip(keys, ref_r)), 0.1, 0.1, sign)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g_got = torch.autograd.grad(got, (c_q, c_p, r))
    g_want = torch.autograd.grad(want, (c_q, c_p, r))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert g_got[2].abs().min() > 0  # every in-batch candidate gets a gradient


class _IdsEncoder:
    """Enough of TextEncoder for candidate_batch: one id per text."""

    def encode_inputs(self, texts, instructions):
        return {"input_ids": torch.arange(len(texts))[:, None], "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}

    def encode_targets(self, texts):
        return {"target_ids": torch.arange(len(texts))[:, None], "target_mask": torch.ones(len(texts), 1, dtype=torch.long)}


def test_option_off_builds_the_same_batch_as_before():
    cfg = Config()
    te = _IdsEncoder()

    class Refs:
        def lookup(self, row):
            return -1.0, [-2.0 - j for j in range(len(row["neg"]))]

    a = stages_for(cfg)["stage2"].make_batch(ROWS, te, Refs())
    b = alignment_batch(ROWS, te, Refs(), p_no_grad=cfg.loss.objective.detach_positive)
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y
    on = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, in_batch_negatives=True),
                             reference=dataclasses.replace(cfg.reference, source="online"))
    order = StepSampler(len(ROWS), len(ROWS), 1, 1, 0)
    batch = stages_for(on)["stage2"].make_batch(stages_for(on)["stage2"].step_rows(ROWS, order, 0, 0, 0), te, None)
    assert len(batch.candidates.owner) == sum(len(r["neg"]) for r in with_in_batch_negatives(ROWS))
    assert torch.isnan(batch.ref_c).all() and torch.isnan(batch.ref_r).all()  # until online_references fills them
    assert "reference" in [s.name for s in stages_for(cfg).planned()]
    assert "reference" not in [s.name for s in stages_for(on).planned()]


@pytest.mark.parametrize("overrides,key", [
    (["reference.source=online"], "reference.source"),
    (["reference.source=offline"], "reference.source"),
])
def test_online_and_in_batch_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_scheduled_rows_are_every_micro_batch_with_its_in_batch_negatives():
    from autoregembed.ground.data import StepSampler

    cfg = load_config(None, ["data.in_batch_negatives=true", "stage2.micro_batch_size=2", "stage2.max_steps=3"])
    got = stages_for(cfg)["stage2"].scheduled_rows(ROWS)
    sampler = StepSampler(len(ROWS), 2, 1, 1, cfg.seed)
    want = [r for step in range(3) for r in with_in_batch_negatives([ROWS[i] for i in sampler.indices(step, 0, 0)])]
    assert {json_key(r) for r in got} == {json_key(r) for r in want}
    assert len(got) == len({json_key(r) for r in want})  # each distinct row once
    assert stages_for(Config())["stage2"].scheduled_rows(ROWS) is ROWS  # without in-batch negatives: the rows themselves


def json_key(row):
    import json

    return json.dumps(row, sort_keys=True)


@pytest.mark.parametrize("in_batch", [False, True], ids=["own-negatives", "in-batch"])
def test_online_references_equal_the_score_file_of_the_stage1_model(tiny_base, tmp_path, in_batch):
    """Stage 2's model with its (trained) adapters disabled scores exactly as the stage-1 export that
    the reference stage reads, and the batch carries those scores as its reference values; with
    in-batch negatives the reference stage scores the pairs of stage 2's schedule."""
    from autoregembed.ground.data import row_key
    from autoregembed.release.export import export_encoder
    from autoregembed.release.meta import ExportMeta
    from autoregembed.run.loading import load_model
    from autoregembed.method.losses import AlignmentLoss
    from autoregembed.run.refscores import ReferenceScores, online_references, save_scores
    from autoregembed.method.tokenization import TextEncoder

    k, lora = 5, dict(rank=4, alpha=8.0, dropout=0.0, targets="all-linear")
    cfg = load_config(None, [f"data.in_batch_negatives={str(in_batch).lower()}", "stage2.micro_batch_size=2",
                             "stage2.max_steps=2"])
    make_batch = stages_for(cfg)["stage2"].make_batch
    torch.manual_seed(0)
    stage1, tok = load_model(tiny_base, tiny_base, k, torch.float32, "sdpa")
    stage1_dir = str(tmp_path / "stage1")
    export_encoder(stage1.encoder, tok, stage1_dir, ExportMeta(num_embed_tokens=k, instruction="I."))
    reference, _ = load_model(stage1_dir, tiny_base, k, torch.float32, "sdpa")  # what the reference stage loads
    model, tok = load_model(stage1_dir, tiny_base, k, torch.float32, "sdpa", lora=lora)  # stage 2
    te = TextEncoder(tok, k, 32, 32)
    rows = [{"query": q, "pos": p, "neg": n, "instruction": "Retrieve semantically similar text."} for q, p, n in [
        ("a man is playing a guitar .", "a man plays the guitar .", ["a woman is slicing an onion .", "a dog runs ."]),
        ("the cat sleeps on the mat .", "a cat is sleeping .", ["the market fell sharply today ."]),
        ("two kids play in the snow .", "children are playing outside .", ["a plane takes off ."])]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move the adapters away from zero, so disabling them matters
        batch = online_references(model, make_batch(with_in_batch_negatives(rows[:2]) if in_batch else rows[:2],
                                                    te, None))
        AlignmentLoss()(model(batch), batch).backward()
        opt.step()
        opt.zero_grad()

    to_score = stages_for(cfg)["stage2"].scheduled_rows(rows)  # what the reference stage scores
    with torch.no_grad():
        file_scores = reference.eval()(candidate_batch(to_score, te))
        live = model.eval()(candidate_batch(to_score, te))
    assert (live.c_q - file_scores.c_q).abs().max() > 1e-4  # the adapters do change the scores
    per_row = [[file_scores.c_q[i].item()] + file_scores.r[file_scores.owner == i].tolist()
               for i in range(len(to_score))]
    path = str(tmp_path / "scores.safetensors")
    save_scores(path, [row_key(r) for r in to_score], per_row, "fp")
    refs = ReferenceScores(path, expected_fingerprint="fp")
    from autoregembed.ground.data import StepSampler

    sampler = StepSampler(len(rows), 2, 1, 1, cfg.seed)
    for step in range(2):  # each micro-batch stage 2 will form
        micro = stages_for(cfg)["stage2"].step_rows(rows, sampler, step, 0, 0)  # as stage 2 forms it
        from_file = make_batch(micro, te, refs)
        model.train()
        online = online_references(model, make_batch(micro, te, None))
        assert model.training  # restored
        assert len(online.ref_r) == sum(len(r["neg"]) for r in micro)
        torch.testing.assert_close(online.ref_c, from_file.ref_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(online.ref_r, from_file.ref_r, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(online.candidates.owner.numpy(), from_file.candidates.owner.numpy())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # adapters train again


def test_cross_device_negatives_pool_every_ranks_micro_batch(monkeypatch):
    """With data.cross_device_negatives each rank's queries also get the other ranks' texts, formed
    from the sampler alone: on 2 ranks of B rows each, exactly what one rank of 2B rows forms."""
    from autoregembed.ground import distributed as D

    rows = [{"query": f"q{i}", "pos": f"p{i}", "neg": [f"n{i}"], "instruction": "i"} for i in range(12)]
    cfg = load_config(None, ["data.in_batch_negatives=true", "data.cross_device_negatives=true"])
    two = StepSampler(len(rows), 3, 1, 2, cfg.seed)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    got = [r for rank in range(2) for r in stages_for(cfg)["stage2"].step_rows(rows, two, 1, 0, rank)]
    monkeypatch.setattr(D, "world_size", lambda: 1)
    want = stages_for(cfg)["stage2"].step_rows(rows, StepSampler(len(rows), 6, 1, 1, cfg.seed), 1, 0, 0)
    assert got == want and all(len(r["neg"]) == 1 + 2 * 5 for r in got)  # own + the 5 other rows' pos and neg
    local = load_config(None, ["data.in_batch_negatives=true"])
    monkeypatch.setattr(D, "world_size", lambda: 2)
    assert all(len(r["neg"]) == 1 + 2 * 2 for r in stages_for(local)["stage2"].step_rows(rows, two, 1, 0, 0))
    with pytest.raises(ConfigError, match="data.cross_device_negatives' needs data.in_batch_negatives"):
        load_config(None, ["data.cross_device_negatives=true"])
