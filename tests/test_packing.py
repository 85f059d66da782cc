"""Padding-free passes (packing.py) give the padded passes' values and gradients.

On CPU the packed attention is SDPA with the block-diagonal mask Transformers derives from the
restarting positions; the varlen adapter (CUDA's path without flash-attn) is checked here with a
per-row reference standing in for torch's CUDA-only kernel, and in tests/test_gpu.py for real.
"""
import pytest
import torch
import torch.nn.functional as F

from autoregembed.method.batches import alignment_batch, compression_batch
from autoregembed.runtime.loading import load_model
from autoregembed.method.losses import AlignmentLoss, CompressionLoss
from autoregembed.method.packing import VARLEN, Packing
from autoregembed.method.tokenization import TextEncoder

K = 3
ROWS = [  # ragged on purpose: encoder inputs and targets of very different lengths
    {"query": "a man is playing a guitar on the stage tonight .", "pos": "a person plays guitar .",
     "neg": ["a woman is cooking .", "nobody"], "instruction": "Retrieve a paraphrase.",
     "context": "a man is playing a guitar on the stage tonight .", "output": "a man plays ."},
    {"query": "cats", "pos": "a cat is asleep on the red sofa in the living room", "neg": ["dogs bark"],
     "instruction": "Find it.", "context": "cats", "output": "cats sleep on the sofa all day long , every day ."},
    {"query": "stocks fell sharply today .", "pos": "markets dropped .", "neg": ["it rained", "stocks rose", "no"],
     "instruction": "Retrieve a paraphrase.", "context": "stocks fell", "output": "stocks fell sharply today ."},
]


class _Refs:
    def lookup(self, row):
        return -5.0, [-9.0] * len(row["neg"])


def _losses_and_grads(model, te):
    out = []
    for batch, loss_fn in ((compression_batch(ROWS, te, contrast=True), CompressionLoss(contrast=1.0)),
                           (alignment_batch(ROWS, te, _Refs()), AlignmentLoss())):
        model.zero_grad()
        loss = loss_fn(model(batch), batch)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.encoder.parameters()
                                              if p.grad is not None])))
    return out


def _pair(tiny_base, attn_packed="sdpa"):
    padded, tok = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa")
    packed, _ = load_model(tiny_base, tiny_base, K, torch.float32, attn_packed, packed=True)
    packed.encoder.load_state_dict(padded.encoder.state_dict())  # the same EMBED rows
    return padded, packed, TextEncoder(tok, K)


def _check_same(padded, packed, te):
    for (l0, g0), (l1, g1) in zip(_losses_and_grads(padded, te), _losses_and_grads(packed, te)):
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    batch = compression_batch(ROWS, te)
    with torch.no_grad():
        torch.testing.assert_close(packed.compress(batch.input_ids, batch.attention_mask),
                                   padded.compress(batch.input_ids, batch.attention_mask), rtol=1e-5, atol=1e-5)


def test_packing_puts_each_rows_tokens_in_order_with_restarting_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = Packing.of(mask)
    assert p.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.cu_seqlens.dtype == torch.int32 and p.max_len == 4
    x = torch.arange(12.0).view(3, 4, 1).requires_grad_()
    packed = p.pack(x)
    assert packed[0, :, 0].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    back = p.unpack(packed, x.shape)
    assert torch.equal(back, x * mask[..., None])  # padding comes back as zeros
    back.sum().backward()
    assert torch.equal(x.grad[..., 0], mask.float())
    assert torch.equal(Packing.of(mask, total=8).index, p.index)  # the host's count: the same packing
    with pytest.raises(RuntimeError, match="8 tokens expected"):
        Packing.of(mask[:, :3], total=8)


def test_packed_passes_match_padded_ones_with_sdpa(tiny_base):
    _check_same(*_pair(tiny_base))


def test_the_varlen_adapter_matches_padded_sdpa(tiny_base, monkeypatch):
    """The wiring of packing.varlen_attention (layouts, row boundaries, causality, grouped KV
    heads), with torch's CUDA-only kernel replaced by causal SDPA row by row."""
    import torch.nn.attention.varlen as varlen

    calls = []

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False, **_):
        calls.append((tuple(q.shape), max_q, window_size, enable_gqa))
        assert torch.equal(cu_q, cu_k) and window_size == (-1, 0)
        out = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                      enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    from autoregembed.method.packing import register_varlen

    register_varlen()
    padded, packed, te = _pair(tiny_base, attn_packed=VARLEN)
    _check_same(padded, packed, te)
    assert calls and all(gqa for *_, gqa in calls)  # the tiny base has 4 query and 2 KV heads


def test_the_varlen_adapter_refuses_padded_batches():
    from autoregembed.method.packing import varlen_attention

    q = torch.zeros(2, 4, 5, 8)
    with pytest.raises(ValueError, match="packed sequences only"):
        varlen_attention(None, q, q, q, None)
