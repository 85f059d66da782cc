"""Stage-1/stage-2 objectives of the batched model against hand-computed references.

The reference runs every (condition, target) pair through the decoder on its own,
with full logits, and applies the paper's formulas scalar by scalar.
"""
import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from autoregembed.batches import candidates_batch, stage1_batch
from autoregembed.model import AutoRegEmbedModel
from autoregembed.tokenization import TextEncoder, prepare_tokenizer

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


def _model(setup, sign, decoder_bos=False):
    tok, encoder, decoder = setup
    bos = tok.bos_token_id if decoder_bos else None
    return (AutoRegEmbedModel(encoder, decoder, K, beta=0.1, tau=0.1, reference_sign=sign, decoder_bos_id=bos),
            TextEncoder(tok, K))


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


@pytest.mark.parametrize("sign,decoder_bos", [("paper", False), ("code", False), ("paper", True)])
def test_stage2_loss_and_grads_match_hand_reference(setup, sign, decoder_bos):
    model, te = _model(setup, sign, decoder_bos)
    g = torch.Generator().manual_seed(3)
    ref_c = (torch.randn(3, generator=g) * 5 - 20).tolist()
    ref_r = [(torch.randn(len(r["neg"]), generator=g) * 5 - 25).tolist() for r in ROWS]

    model.zero_grad()
    batch = candidates_batch(ROWS, te, with_positive_inputs=True)
    loss = model.stage2_loss(**batch, ref_c=torch.tensor(ref_c),
                             ref_r=torch.tensor([v for rs in ref_r for v in rs]))
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
    for sign in ("paper", "code"):
        model, te = _model(setup, sign)
        batch = candidates_batch(ROWS, te, with_positive_inputs=True)
        with torch.no_grad():
            outs.append(model.stage2_loss(**batch, ref_c=torch.full((3,), -10.0),
                                          ref_r=torch.full((6,), -30.0)).item())
    assert outs[0] != pytest.approx(outs[1])


def test_detach_positive_keeps_the_loss_and_stops_the_gradient_into_c_p():
    """c_p becomes a target: same loss value, no gradient into it, and c_q's gradient unchanged
    (the one computed by hand), so in the model only the positive's own encoding loses its gradient."""
    from autoregembed.losses import alignment_loss

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
    """AutoRegEmbedModel(detach_positive=True) trains exactly as the loss with c_p held constant."""
    from autoregembed.losses import alignment_loss

    model, te = _model(setup, "paper")
    batch = candidates_batch(ROWS, te, with_positive_inputs=True)
    refs = dict(ref_c=torch.full((3,), -10.0), ref_r=torch.full((6,), -30.0))
    grads = {}
    for detach in (False, True):
        model.detach_positive = detach
        model.encoder.zero_grad()
        model.stage2_loss(**batch, **refs).backward()
        grads[detach] = _grads(model)
    model.detach_positive = False
    model.encoder.zero_grad()
    c_q, c_p, r = model.candidate_scores(**batch)
    alignment_loss(c_q, c_p.detach(), r, batch["owner"], **refs).backward()
    want = _grads(model)
    model.encoder.zero_grad()
    for n in want:
        torch.testing.assert_close(grads[True][n], want[n], atol=1e-7, rtol=1e-5, msg=n)
    assert any(not torch.allclose(grads[True][n], grads[False][n]) for n in want)


@pytest.mark.parametrize("decoder_bos", [False, True])
def test_stage1_loss_is_token_mean_cross_entropy(setup, decoder_bos):
    model, te = _model(setup, "paper", decoder_bos)
    rows = [{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]} for r in ROWS]
    with torch.no_grad():
        loss = model.stage1_loss(**stage1_batch(rows, te))
        total, n = 0.0, 0
        for r in rows:
            e = _compress_one(model, te, r["context"], r["instruction"])
            total += _logp_one(model, te, e, r["output"]).item()
            n += len(te.target_ids(r["output"]))
    assert loss.item() == pytest.approx(-total / n, rel=1e-5)


def test_decoder_bos_changes_what_the_decoder_reads(setup):
    """The flag reaches the decoder: the loss moves (the tiny LM has no strong attention sink, so
    only by ~3e-4 nats/token here; float32 noise on it is ~1e-6)."""
    rows = [{"context": r["query"], "instruction": "Reconstruct.", "output": r["query"]} for r in ROWS]
    (plain, te), (bos, _) = (_model(setup, "paper", flag) for flag in (False, True))
    batch = stage1_batch(rows, te)
    with torch.no_grad():
        assert abs(plain.stage1_loss(**batch).item() - bos.stage1_loss(**batch).item()) > 1e-4


def test_decoder_never_runs_the_lm_head_and_stays_frozen(setup):
    """Training-time scoring goes through sequence_logprobs, not lm_head(...) over [S, T, V]."""
    model, te = _model(setup, "paper")
    called = []
    hook = model.decoder.get_output_embeddings().register_forward_hook(lambda *a: called.append(1))
    try:
        batch = candidates_batch(ROWS, te, with_positive_inputs=True)
        loss = model.stage2_loss(**batch, ref_c=torch.zeros(3), ref_r=torch.zeros(6))
        loss.backward()
    finally:
        hook.remove()
    assert not called
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None for p in model.encoder.parameters())


def test_load_model_wires_decoder_bos_to_the_tokenizers_bos(tiny_base):
    from autoregembed.loading import load_model

    on, tok = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", decoder_bos=True)
    off, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa")
    assert on.decoder_bos_id == tok.bos_token_id is not None
    assert off.decoder_bos_id is None


def test_config_reaches_the_model_loss_settings(tiny_base):
    """loss.* keys arrive on the model the trainer builds (trainer.Session passes them to load_model)."""
    from autoregembed.config import load_config
    from autoregembed.loading import load_model
    from autoregembed.trainer import loss_settings

    cfg = load_config(None, ["loss.detach_positive=true", "loss.reference_sign=code", "loss.beta=0.2"])
    model, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", loss=loss_settings(cfg))
    assert (model.detach_positive, model.reference_sign, model.beta, model.tau) == (True, "code", 0.2, 0.1)
