"""Stage-1/stage-2 objectives of the batched model against hand-computed references.

The reference runs every (condition, target) pair through the decoder on its own,
with full logits, and applies the paper's formulas scalar by scalar.
"""
import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from autoregembed.method.batches import alignment_batch, compression_batch
from autoregembed.method.losses import AlignmentLoss, CompressionLoss
from autoregembed.method.model import AutoRegEmbedModel
from autoregembed.method.tokenization import TextEncoder, prepare_tokenizer

K = 3
ROWS = [
    {"query": "a man is playing a guitar .", "pos": "a person plays guitar .", "neg": ["a woman is cooking ."],
     "instruction": "Retrieve a paraphrase."},
    {"query": "the cat sleeps on the sofa", "pos": "a cat is asleep",
     "neg": ["dogs bark loudly at night", "the sofa is red", "nobody is sleeping"], "instruction": "Find it."},
    {"query": "stocks fell sharply today .", "pos": "markets dropped .", "neg": ["it rained", "stocks rose today ."],
     "instruction": "Retrieve a paraphrase."},
]


@pytest.fixture(scope="module")
def setup(tiny_base):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_base), K)
    encoder = AutoModel.from_pretrained(tiny_base, dtype=torch.float32)
    encoder.resize_token_embeddings(len(tok))
    decoder = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return tok, encoder, decoder


def _model(setup, decoder_bos=False, scorer="auto"):
    tok, encoder, decoder = setup
    bos = tok.bos_token_id if decoder_bos else None
    return AutoRegEmbedModel(encoder, decoder, K, decoder_bos_id=bos, scorer=scorer), TextEncoder(tok, K)


class _Refs:
    """Reference scores for ROWS: ref_c per query and ref_r per negative, in row order."""

    def __init__(self, ref_c, ref_r):
        self.by_query = {r["query"]: (c, list(rs)) for r, c, rs in zip(ROWS, ref_c, ref_r)}

    def lookup(self, row):
        return self.by_query[row["query"]]


def _constant_refs(c, r):
    return _Refs([c] * len(ROWS), [[r] * len(row["neg"]) for row in ROWS])


def _stage2_loss(model, te, refs, **loss_settings):
    batch = alignment_batch(ROWS, te, refs)
    return AlignmentLoss(**loss_settings)(model(batch), batch)


def _compress_one(model, te, text, instruction):
    ids = torch.tensor([te.encoder_ids(text, instruction)])
    hidden = model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return hidden[0, -K:]  # no padding: the EMBED tokens are the last k


def _logp_one(model, te, e, target):
    t = torch.tensor(te.target_ids(target))
    words = model.decoder.get_input_embeddings()
    lead = [] if model.decoder_bos_id is None else [words(torch.tensor([model.decoder_bos_id]))]
    x = torch.cat(lead + [e, words(t)])[None]
    logits = model.decoder(inputs_embeds=x).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    p = len(lead) + K  # position p-1+i predicts target token i
    return sum(lp[p - 1 + i, t[i]] for i in range(len(t)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sign,decoder_bos,scorer", [("paper", False, "auto"), ("code", False, "auto"),
                                                     ("paper", True, "auto"), ("paper", False, "cce")])
def test_stage2_loss_and_grads_match_hand_reference(setup, sign, decoder_bos, scorer):
    model, te = _model(setup, decoder_bos, scorer)
    g = torch.Generator().manual_seed(3)
    ref_c = (torch.randn(3, generator=g) * 5 - 20).tolist()
    ref_r = [(torch.randn(len(r["neg"]), generator=g) * 5 - 25).tolist() for r in ROWS]

    model.zero_grad()
    loss = _stage2_loss(model, te, _Refs(ref_c, ref_r), reference_sign=sign, detach_positive=False)  # as published
    loss.backward()
    got = _grads(model)

    model.zero_grad()
    per_query = []
    for row, rc, rrs in zip(ROWS, ref_c, ref_r):
        e_q = _compress_one(model, te, row["query"], row["instruction"])
        e_p = _compress_one(model, te, row["pos"], row["instruction"])
        c_q, c_p = _logp_one(model, te, e_q, row["pos"]), _logp_one(model, te, e_p, row["pos"])
        terms = []
        for neg, rr in zip(row["neg"], rrs):
            r = _logp_one(model, te, e_q, neg)
            ref_margin = rc - rr
            margin = (c_q - r) - ref_margin if sign == "paper" else (c_q - r) + ref_margin
            s1 = torch.sigmoid(0.1 * (c_q - c_p).abs())
            s2 = torch.sigmoid(0.1 * margin)
            terms.append(torch.log1p(torch.exp((s1 - s2) / 0.1)))
        per_query.append(sum(terms) / len(terms))
    ref_loss = sum(per_query) / len(per_query)
    ref_loss.backward()
    want = _grads(model)

    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


def test_reference_sign_changes_the_loss(setup):
    outs = []
    model, te = _model(setup)
    for sign in ("paper", "code"):
        with torch.no_grad():
            outs.append(_stage2_loss(model, te, _constant_refs(-10.0, -30.0), reference_sign=sign).item())
    assert outs[0] != pytest.approx(outs[1])


def test_detach_positive_keeps_the_loss_and_stops_the_gradient_into_c_p():
    """c_p becomes a target: same loss value, no gradient into it, and c_q's gradient unchanged
    (the one computed by hand), so in the model only the positive's own encoding loses its gradient."""
    from autoregembed.method.losses import alignment_loss

    owner = torch.tensor([0, 1, 1])
    cq0, cp0, r0 = [-42.0, -30.0], [-36.0, -33.0], [-55.0, -41.0, -37.0]
    ref_c, ref_r = torch.tensor([-40.0, -35.0]), torch.tensor([-50.0, -45.0, -38.0])
    values = {}
    for detach in (False, True):
        c_q, c_p, r = (torch.tensor(v, requires_grad=True) for v in (cq0, cp0, r0))
        loss = alignment_loss(c_q, c_p, r, owner, ref_c, ref_r, detach_positive=detach)
        loss.backward()
        values[detach] = (loss.item(), c_q.grad.clone(), c_p.grad)
    assert values[True][0] == pytest.approx(values[False][0])
    assert values[True][2] is None and values[False][2].abs().min() > 0

    def by_hand(c_q):  # the formula in float64, c_p a constant, per query then mean
        terms = [[], []]
        for i, q in enumerate(owner.tolist()):
            s1 = torch.sigmoid(0.1 * (c_q[q] - cp0[q]).abs())
            s2 = torch.sigmoid(0.1 * ((c_q[q] - r0[i]) - (ref_c[q].double() - ref_r[i].double())))
            terms[q].append(torch.nn.functional.softplus((s1 - s2) / 0.1))
        return sum(sum(t) / len(t) for t in terms) / 2

    want = torch.autograd.functional.jacobian(by_hand, torch.tensor(cq0, dtype=torch.float64))
    torch.testing.assert_close(values[True][1].double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[True][1], values[False][1])


def test_model_stage2_loss_detaches_the_positive_when_asked(setup):
    """AlignmentLoss(detach_positive=True) trains exactly as the loss with c_p held constant."""
    from autoregembed.method.losses import alignment_loss

    model, te = _model(setup)
    refs = _constant_refs(-10.0, -30.0)
    grads = {}
    for detach in (False, True):
        model.encoder.zero_grad()
        _stage2_loss(model, te, refs, detach_positive=detach).backward()
        grads[detach] = _grads(model)
    model.encoder.zero_grad()
    batch = alignment_batch(ROWS, te, refs)
    out = model(batch)
    alignment_loss(out.c_q, out.c_p.detach(), out.r, out.owner, batch.ref_c, batch.ref_r).backward()
    want = _grads(model)
    model.encoder.zero_grad()
    for n in want:
        torch.testing.assert_close(grads[True][n], want[n], atol=1e-7, rtol=1e-5, msg=n)
    assert any(not torch.allclose(grads[True][n], grads[False][n]) for n in want)


@pytest.mark.parametrize("decoder_bos", [False, True])
def test_stage1_loss_is_token_mean_cross_entropy(setup, decoder_bos):
    model, te = _model(setup, decoder_bos)
    rows = [{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]} for r in ROWS]
    with torch.no_grad():
        batch = compression_batch(rows, te)
        loss = CompressionLoss()(model(batch), batch)
        total, n = 0.0, 0
        for r in rows:
            e = _compress_one(model, te, r["context"], r["instruction"])
            total += _logp_one(model, te, e, r["output"]).item()
            n += len(te.target_ids(r["output"]))
    assert loss.item() == pytest.approx(-total / n, rel=1e-5)


@pytest.mark.parametrize("decoder_bos", [False, True])
def test_stage1_contrast_adds_the_per_token_margin_over_the_previous_rows_tokens(setup, decoder_bos):
    """loss = CE + w * mean_i softplus(-(log p(t_i|e_i) - log p(t_i|e_{i-1})) / |t_i|), every value
    computed row by row here; with contrast off the batch computes the plain loss."""
    import torch.nn.functional as F

    model, te = _model(setup, decoder_bos)
    rows = [{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]} for r in ROWS]
    with torch.no_grad():
        batch = compression_batch(rows, te, contrast=True)
        out = model(batch)
        loss = CompressionLoss(contrast=0.5)(out, batch)
        e = [_compress_one(model, te, r["context"], r["instruction"]) for r in rows]
        own = [_logp_one(model, te, e[i], r["output"]).item() for i, r in enumerate(rows)]
        other = [_logp_one(model, te, e[i - 1], r["output"]).item() for i, r in enumerate(rows)]
    n = [len(te.target_ids(r["output"])) for r in rows]
    margin = torch.tensor([(o - x) / k for o, x, k in zip(own, other, n)])
    want = -sum(own) / sum(n) + 0.5 * F.softplus(-margin).mean().item()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert out.logp.tolist() == pytest.approx(own, rel=1e-5)
    plain = compression_batch(rows, te)
    with torch.no_grad():
        assert CompressionLoss()(model(plain), plain).item() == pytest.approx(-sum(own) / sum(n), rel=1e-5)


def test_decoder_bos_changes_what_the_decoder_reads(setup):
    """The flag reaches the decoder: the loss moves (the tiny LM has no strong attention sink, so
    only by ~3e-4 nats/token here; float32 noise on it is ~1e-6)."""
    rows = [{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]} for r in ROWS]
    (plain, te), (bos, _) = (_model(setup, flag) for flag in (False, True))
    batch = compression_batch(rows, te)
    with torch.no_grad():
        assert abs(CompressionLoss()(plain(batch), batch).item() - CompressionLoss()(bos(batch), batch).item()) > 1e-4


def test_decoder_never_runs_the_lm_head_and_stays_frozen(setup):
    """Training-time scoring goes through sequence_logprobs, not lm_head(...) over [S, T, V]."""
    model, te = _model(setup)
    called = []
    hook = model.decoder.get_output_embeddings().register_forward_hook(lambda *a: called.append(1))
    try:
        _stage2_loss(model, te, _constant_refs(0.0, 0.0)).backward()
    finally:
        hook.remove()
    assert not called
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None for p in model.encoder.parameters())


def test_a_decoder_held_outside_the_module_scores_the_same_and_is_hidden_from_the_engine(setup):
    """model.shard_decoder=false: DeepSpeed sees only the encoder (parameters, state_dict, .to),
    train()/eval() still reach the decoder, and every value and gradient is the same."""
    tok, encoder, decoder = setup
    inside = AutoRegEmbedModel(encoder, decoder, K)
    outside = AutoRegEmbedModel(encoder, decoder, K, decoder_in_module=False)
    names = [n for n, _ in outside.named_parameters()]
    assert names and all(n.startswith("encoder.") for n in names) and "decoder" not in outside._modules
    assert not any(k.startswith("decoder.") for k in outside.state_dict())
    assert any(n.startswith("decoder.") for n, _ in inside.named_parameters())
    outside.eval()
    assert not decoder.training
    outside.train()
    assert decoder.training
    te = TextEncoder(tok, K)
    grads = []
    for model in (inside, outside):
        model.zero_grad()
        _stage2_loss(model, te, _constant_refs(-5.0, -9.0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    encoder.zero_grad()


def test_the_decoders_checkpointing_is_its_own_choice(tiny_base):
    from autoregembed.run.loading import load_model

    both, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", gradient_checkpointing=True)
    assert both.encoder.is_gradient_checkpointing and both.decoder.is_gradient_checkpointing
    enc_only, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", gradient_checkpointing=True,
                             decoder_checkpointing=False)
    assert enc_only.encoder.is_gradient_checkpointing and not enc_only.decoder.is_gradient_checkpointing


def test_selective_decoder_checkpointing_recomputes_only_its_first_layers_with_the_same_gradients(tiny_base):
    """model.decoder_checkpointing=n: the first n layers run twice in a training step (forward and
    recompute), the rest once, and the gradient reaching the compressed tokens is unchanged."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.run.loading import load_frozen_decoder

    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    grads, calls = {}, {}
    for label, n in (("all", True), ("first", 1), ("none", False)):
        decoder = load_frozen_decoder(tiny_base, torch.float32, "sdpa", n).train()
        layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
        calls[label] = [0] * len(layers)
        for i, layer in enumerate(layers):  # its first norm starts the layer's forward and its recompute
            layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i, c=calls[label]: c.__setitem__(i, c[i] + 1))
        e = x.clone().requires_grad_()
        decoder(inputs_embeds=e).logits.logsumexp(-1).sum().backward()
        grads[label] = e.grad
    assert calls == {"all": [2, 2], "first": [2, 1], "none": [1, 1]}
    torch.testing.assert_close(grads["first"], grads["all"], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads["none"], grads["all"], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="model.decoder_checkpointing.*3 layers to recompute.*has 2"):
        load_frozen_decoder(tiny_base, torch.float32, "sdpa", 3)
    assert load_config(None, ["model.decoder_checkpointing=12"]).model.decoder_checkpointing == 12
    with pytest.raises(ConfigError, match="'model.decoder_checkpointing': true, false or a number"):
        load_config(None, ["model.decoder_checkpointing=-1"])


def test_load_model_wires_decoder_bos_to_the_tokenizers_bos(tiny_base):
    from autoregembed.run.loading import load_model

    on, tok = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", decoder_bos=True)
    off, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa")
    assert on.decoder_bos_id == tok.bos_token_id is not None
    assert off.decoder_bos_id is None


def test_config_reaches_the_stage_losses():
    """loss.* keys configure stage 2's objective and stage1_loss.* stage 1's (the config loader builds
    both); the reference stage trains nothing."""
    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.run.stages import stages_for

    cfg = load_config(None, ["loss.detach_positive=true", "loss.reference_sign=code", "loss.beta=0.2"])
    assert stages_for(cfg)["stage2"].loss() == AlignmentLoss(beta=0.2, tau=0.1, reference_sign="code", detach_positive=True)
    assert stages_for(cfg)["stage1"].loss() == CompressionLoss(contrast=4.0) and not stages_for(cfg)["reference"].trains
    cfg = load_config(None, ["stage1_loss.contrast=0.5"])
    assert stages_for(cfg)["stage1"].loss() == CompressionLoss(contrast=0.5)
    assert stages_for(cfg)["stage1"].loss_settings() == {"kind": "compression", "contrast": 0.5}
    with pytest.raises(ConfigError, match="key 'loss.reference_sign': 'both' is not"):
        AlignmentLoss(reference_sign="both")


def test_a_new_stage1_objective_is_one_class_and_one_kind(setup):
    """As for stage 2: a class registered under a kind gets its stage1_loss.* keys (another kind's are
    unknown), its micro-batch minimum checked against stage1.micro_batch_size, and stage 1 trains with it."""
    import dataclasses

    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.method.losses import STAGE1_OBJECTIVES, stage1_objective
    from autoregembed.run.stages import stages_for

    saved = dict(STAGE1_OBJECTIVES)

    @stage1_objective("scaled")
    @dataclasses.dataclass(frozen=True)
    class ScaledCompression:
        """The reconstruction loss times a weight, each row alone."""

        weight: float = 1.0
        min_micro_batch_size = 1

        def check(self, key):
            if self.weight <= 0:
                raise ConfigError(f"key '{key}.weight' must be > 0")

        def batch(self, rows, text_encoder):
            return compression_batch(rows, text_encoder)

        def __call__(self, out, batch):
            return self.weight * CompressionLoss()(out, batch)

    try:
        cfg = load_config(None, ["stage1_loss.kind=scaled", "stage1_loss.weight=3", "stage1.micro_batch_size=1"])
        stage1 = stages_for(cfg)["stage1"]
        assert stage1.loss() == ScaledCompression(3.0) and stage1.loss_settings() == {"kind": "scaled", "weight": 3.0}
        with pytest.raises(ConfigError, match="unknown key 'stage1_loss.contrast'"):
            load_config(None, ["stage1_loss.kind=scaled", "stage1_loss.contrast=1"])
        with pytest.raises(ConfigError, match="key 'stage1_loss.weight' must be > 0"):
            load_config(None, ["stage1_loss.kind=scaled", "stage1_loss.weight=0"])
        model, te = _model(setup)
        batch = stage1.make_batch([{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]}
                                   for r in ROWS], te, None)
        out = model(batch)
        torch.testing.assert_close(stage1.loss()(out, batch), 3.0 * CompressionLoss()(out, batch))
    finally:
        STAGE1_OBJECTIVES.clear()
        STAGE1_OBJECTIVES.update(saved)


def test_a_new_stage2_objective_is_one_class_and_one_kind(setup):
    """Registering a class under a kind is all it takes: its fields become loss.* keys of that kind
    (strictly: another kind's keys are unknown), its check names them, and stage 2 trains with the
    object the loader built."""
    import dataclasses

    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.method.losses import STAGE2_OBJECTIVES, stage2_objective
    from autoregembed.run.stages import stages_for

    saved = dict(STAGE2_OBJECTIVES)

    @stage2_objective("margin")
    @dataclasses.dataclass(frozen=True)
    class MarginLoss:
        """A hinge on the query's margin of the positive over each negative."""

        needs_references = True
        margin: float = 1.0

        def check(self, key):
            if self.margin <= 0:
                raise ConfigError(f"key '{key}.margin' must be > 0")

        def batch(self, rows, text_encoder, references):
            return alignment_batch(rows, text_encoder, references)

        def __call__(self, out, batch):
            return torch.relu(self.margin - (out.c_q[out.owner] - out.r)).mean()

    try:
        cfg = load_config(None, ["loss.kind=margin", "loss.margin=2.5", "data.in_batch_negatives=true"])
        assert stages_for(cfg)["stage2"].loss() == MarginLoss(2.5) and cfg.data.in_batch_negatives
        assert stages_for(cfg)["stage2"].loss_settings()["kind"] == "margin"
        with pytest.raises(ConfigError, match="unknown key 'loss.beta'"):
            load_config(None, ["loss.kind=margin", "loss.beta=0.2"])
        with pytest.raises(ConfigError, match="key 'loss.margin' must be > 0"):
            load_config(None, ["loss.kind=margin", "loss.margin=0"])
        model, te = _model(setup)
        batch = stages_for(cfg)["stage2"].make_batch(ROWS, te, _constant_refs(-20.0, -25.0))
        out = model(batch)
        want = torch.relu(2.5 - (out.c_q[out.owner] - out.r)).mean()
        torch.testing.assert_close(stages_for(cfg)["stage2"].loss()(out, batch), want)
    finally:
        STAGE2_OBJECTIVES.clear()
        STAGE2_OBJECTIVES.update(saved)


def test_infonce_loss_and_grads_match_a_hand_reference(setup):
    """loss.kind=infonce: each query's cosine to its positive against every distinct document of the
    micro-batch, over the temperature, on the export's embeddings (each text encoded alone here); a text
    that is one row's positive and another's negative is one column; no reference values, no decoder."""
    import torch.nn.functional as F

    from autoregembed.method.batches import ContrastBatch
    from autoregembed.method.losses import InfoNCELoss
    from autoregembed.run.config import load_config
    from autoregembed.run.stages import stages_for

    cfg = load_config(None, ["loss.kind=infonce", "loss.temperature=0.07"])
    assert stages_for(cfg)["stage2"].loss() == InfoNCELoss(0.07) and stages_for(cfg)["stage2"].reference_source() is None
    assert [s.name for s in stages_for(cfg).planned()] == ["stage1", "stage2", "eval"]  # no reference stage to run
    rows = [*ROWS, {**ROWS[0], "query": "someone strums a guitar", "neg": ["markets dropped ."]}]  # row 2's positive
    model, te = _model(setup)
    model.pooled = [0, 1]
    batch = stages_for(cfg)["stage2"].make_batch(rows, te, None)
    assert isinstance(batch, ContrastBatch) and batch.positive.tolist() == [0, 1, 2, 0]
    docs = list(dict.fromkeys([r["pos"] for r in rows] + [n for r in rows for n in r["neg"]]))
    assert batch.d_input_ids.shape[0] == len(docs) == 9
    model.zero_grad()
    loss = stages_for(cfg)["stage2"].loss()(model(batch), batch)
    loss.backward()
    got = _grads(model)

    def emb(text, instruction):
        return F.normalize(_compress_one(model, te, text, instruction)[[0, 1]].mean(0), dim=0)

    model.zero_grad()
    q = torch.stack([emb(r["query"], r["instruction"]) for r in rows])
    owner = {}  # each document's instruction: the first row that holds it
    for r in rows:
        for t in [r["pos"], *r["neg"]]:
            owner.setdefault(t, r["instruction"])
    d = torch.stack([emb(t, owner[t]) for t in docs])
    labels = torch.tensor([docs.index(r["pos"]) for r in rows])
    want = sum(-torch.log_softmax(q[i] @ d.T / 0.07, 0)[labels[i]] for i in range(len(rows))) / len(rows)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    for n, g in _grads(model).items():
        torch.testing.assert_close(got[n], g, atol=1e-4, rtol=1e-3)
    alone = AutoRegEmbedModel(model.encoder, None, K)  # what stage 2 builds for it: no decoder in memory
    alone.pooled = model.pooled
    assert not InfoNCELoss.reads_decoder and not stages_for(cfg)["stage2"].reads_decoder()
    torch.testing.assert_close(stages_for(cfg)["stage2"].loss()(alone.train()(batch), batch), loss, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="built without the decoder"):
        alone.score(torch.zeros(1, K, 8), batch.q_input_ids[:1], batch.q_attention_mask[:1])


def test_the_decoder_is_frozen_and_computes_the_same_in_train_mode(tiny_base):
    """engine.train() reaches the decoder (so Transformers checkpoints its layers); a decoder configured
    with dropout must still compute in train mode exactly what it computes in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attention_dropout=0.5)
    model = AutoRegEmbedModel(AutoModel.from_pretrained(tiny_base, dtype=torch.float32), decoder, K).train()
    assert decoder.training and not any(p.requires_grad for p in decoder.parameters())
    x = torch.randn(2, 9, decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runs = [decoder.get_decoder()(inputs_embeds=x).last_hidden_state for _ in range(2)]
        model.eval()
        runs.append(decoder.get_decoder()(inputs_embeds=x).last_hidden_state)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[0], runs[2], rtol=0, atol=0)


@pytest.mark.parametrize("decoder_bos", [False, True])
def test_a_positive_held_as_a_target_runs_without_gradient_to_the_same_loss_and_gradients(setup, decoder_bos):
    """loss.detach_positive: the positives' encoder rows and pos|e_p decoder rows run under no_grad
    (p_no_grad), with the loss and every encoder gradient of the stacked pass that detaches c_p after."""
    model, te = _model(setup, decoder_bos)
    refs = _constant_refs(-10.0, -30.0)
    losses, grads = {}, {}
    for no_grad in (False, True):
        model.encoder.zero_grad()
        batch = alignment_batch(ROWS, te, refs, p_no_grad=no_grad)
        out = model(batch)
        assert out.c_p.requires_grad != no_grad
        losses[no_grad] = AlignmentLoss(detach_positive=True)(out, batch)
        losses[no_grad].backward()
        grads[no_grad] = _grads(model)
    model.encoder.zero_grad()
    torch.testing.assert_close(losses[True], losses[False], atol=1e-6, rtol=1e-6)
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-6, msg=n)
