"""Padding-free passes (packing.py) give the padded passes' values and gradients.

On CPU the packed attention is SDPA with the block-diagonal mask Transformers derives from the
restarting positions; the varlen adapter (CUDA's path without flash-attn) is checked here with a
per-row reference standing in for torch's CUDA-only kernel, and in tests/test_gpu.py for real.
"""
import pytest
import torch
import torch.nn.functional as F

from autoregembed.method.batches import alignment_batch, compression_batch
from autoregembed.run.loading import load_model
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


def _rows_attention(q, k, v, cu, scale=None, enable_gqa=False):
    """Causal SDPA row by row: what torch's CUDA-only varlen kernel computes."""
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


# Strict stand-ins with the public signatures of torch.nn.attention.varlen.varlen_attn: a keyword a
# release lacks is a TypeError, as it is there; a release without enable_gqa refuses grouped K/V heads.
def varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and query.shape[1] == key.shape[1], "torch 2.9 has no enable_gqa"
    return _rows_attention(query, key, value, cu_seq_q)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    assert window_size == (-1, 0) and query.shape[1] == key.shape[1], "torch 2.10/2.11 have no enable_gqa"
    return _rows_attention(query, key, value, cu_seq_q, scale)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0)
    return _rows_attention(query, key, value, cu_seq_q, scale, enable_gqa)


@pytest.mark.parametrize("release", [varlen_2_9, varlen_2_11, varlen_2_12])
def test_the_varlen_adapter_matches_padded_sdpa_on_every_torch_release(tiny_base, monkeypatch, release):
    """The wiring of packing.varlen_attention (layouts, row boundaries, causality, grouped KV heads: the
    tiny base has 4 query and 2 KV heads) against each release's signature, the kernel replaced by
    causal SDPA row by row; torch 2.11 (the GPU image's) used to get an enable_gqa it does not know."""
    import torch.nn.attention.varlen as varlen

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return release(*args, **kwargs)

    counted.__signature__ = __import__("inspect").signature(release)
    monkeypatch.setattr(varlen, "varlen_attn", counted)
    from autoregembed.method.packing import register_varlen

    register_varlen()
    padded, packed, te = _pair(tiny_base, attn_packed=VARLEN)
    _check_same(padded, packed, te)
    assert calls and all(("enable_gqa" in c) == (release is varlen_2_12) for c in calls)


def test_no_varlen_kernel_means_padded_sdpa_and_the_choice_is_said(monkeypatch, capsys):
    """A GPU without flash-attn and a torch without varlen attention (< 2.9) runs padded SDPA, not the
    O(tokens^2) packed reference; the log says which attention runs."""
    import builtins

    from autoregembed.method import packing
    from autoregembed.run import loading

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name == "flash_attn" else real_import(name, *a, **kw))
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "sdpa_without_cudnn", lambda: None)
    monkeypatch.setattr(loading, "_said", set())
    monkeypatch.setattr(loading, "has_varlen", lambda: False)
    assert loading.resolve_attention("auto", None) == ("sdpa", False)
    assert loading.resolve_attention("auto", True) == ("sdpa", True)  # asked for: kept
    monkeypatch.setattr(loading, "has_varlen", lambda: True)
    monkeypatch.setattr(loading, "register_varlen", lambda: None)
    assert loading.resolve_attention("auto", None) == (packing.VARLEN, True)
    assert loading.resolve_attention("auto", False) == ("sdpa", False)
    out = capsys.readouterr().out
    assert "[autoregembed] attention: sdpa, padded passes" in out
    assert f"[autoregembed] attention: {packing.VARLEN}, packed (padding-free) passes" in out
    assert packing.has_varlen()  # this torch has one


def test_the_varlen_adapter_refuses_padded_batches():
    from autoregembed.method.packing import varlen_attention

    q = torch.zeros(2, 4, 5, 8)
    with pytest.raises(ValueError, match="packed sequences only"):
        varlen_attention(None, q, q, q, None)
