"""On a CUDA device: the scorer (cuBLAS GEMMs, compiled row kernel) against float64.

Skipped without a GPU (conftest.py); tests/test_kernel_ptx.py covers what a CPU can check.
"""
import pytest
import torch

from autoregembed.method import logprobs
from autoregembed.method.logprobs import IGNORE_INDEX, sequence_logprobs
from autoregembed.method.scorers import scorer_for

pytestmark = pytest.mark.gpu

# (V, M, D): vocabularies of LLaMA-2, GPT-2 (odd), LLaMA-3; one token, odd and >16k token counts
SHAPES = [(32000, 1, 4096), (50257, 333, 1000), (128256, 2049, 4096), (32000, 16400, 4096), (151936, 77, 3584)]


def _problem(v, m, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(m, d, device="cuda", generator=g)
    w = torch.randn(v, d, device="cuda", generator=g) / d ** 0.5 * 4
    y = torch.randint(0, v, (m,), device="cuda", generator=g)
    y[-1] = v - 1
    return h.to(dtype), w.to(dtype), y


def _reference(h, w, y, g):
    h64 = h.double().requires_grad_()
    lp = torch.log_softmax(h64 @ w.double().T, -1).gather(1, y[:, None])[:, 0]
    (lp * g).sum().backward()
    return lp.detach(), h64.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v,m,d", SHAPES)
def test_scorer_matches_float64_at_llm_shapes(v, m, d, dtype):
    h, w, y = _problem(v, m, d, dtype)
    g = torch.randn(m, device="cuda", dtype=torch.float64)
    ref_lp, ref_grad = _reference(h, w, y, g)
    hh = h.clone().requires_grad_()
    lp = logprobs.token_logprobs(hh, w, y)
    (lp * g.float()).sum().backward()
    # bf16 operands are exact in the fp32 accumulator: what differs is summation order (and the
    # bf16 rounding of dZ and of the Jacobian)
    lp_tol, grad_tol = (2e-3, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    torch.testing.assert_close(lp.double(), ref_lp, atol=lp_tol, rtol=1e-4)
    scale = ref_grad.abs().max().item()
    assert (hh.grad.double() - ref_grad).abs().max().item() <= grad_tol * max(scale, 1.0)


@pytest.mark.parametrize("scorer", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scorer_on_cuda_matches_float64(dtype, scorer):
    """The scorer's CUDA branch (half-precision GEMMs with fp32 logits, bf16 dZ), with the Triton row
    kernel and with PyTorch's row operations, over several chunks with a partial last one."""
    h, w, y = _problem(32000, 700, 1024, dtype, seed=1)
    g = torch.randn(700, device="cuda", dtype=torch.float64)
    ref_lp, ref_grad = _reference(h, w, y, g)
    hh = h.clone().requires_grad_()
    lp = logprobs.token_logprobs(hh, w, y, tile_budget_bytes=256 * 32000 * 8, scorer=scorer)
    (lp * g.float()).sum().backward()
    tol = 2e-3 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=1e-4)
    assert (hh.grad.double() - ref_grad).abs().max().item() <= 2e-2 * max(ref_grad.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cut_cross_entropy_backend_on_cuda_matches_float64(dtype):
    """scorer.kind=cce on CUDA runs cut-cross-entropy's own kernels (impl cce, no gradient filter):
    per-token values and gradients against float64 as tight as ours, at an odd vocabulary."""
    pytest.importorskip("cut_cross_entropy")

    h, w, y = _problem(50257, 700, 1024, dtype, seed=4)
    g = torch.randn(700, device="cuda", dtype=torch.float64)
    ref_lp, ref_grad = _reference(h, w, y, g)
    hh = h.clone().requires_grad_()
    lp = scorer_for("cce").token_logprobs(hh, w, y)
    (lp * g.float()).sum().backward()
    assert lp.dtype == torch.float32
    tol = 2e-3 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=1e-4)
    assert (hh.grad.double() - ref_grad).abs().max().item() <= 2e-2 * max(ref_grad.abs().max().item(), 1.0)


def test_sequence_logprobs_uses_the_row_kernel_on_cuda_and_agrees_with_pytorch_rows(monkeypatch):
    import autoregembed.kernels.logit_rows as K

    h, w, _ = _problem(32000, 5 * 40, 512, torch.bfloat16, seed=2)
    hidden = h.view(5, 40, 512)
    labels = torch.randint(0, 32000, (5, 40), device="cuda")
    labels[:, :7] = IGNORE_INDEX
    calls = []
    real = K.logit_row_stats
    monkeypatch.setattr(K, "logit_row_stats", lambda *a: calls.append(1) or real(*a))
    kernel = sequence_logprobs(hidden, w, labels, scorer_for("auto"))
    assert calls
    torch.testing.assert_close(kernel, sequence_logprobs(hidden, w, labels, scorer_for("torch")), atol=2e-3,
                               rtol=1e-5)


def test_the_trainers_adamw_is_fused_on_cuda_and_steps_like_foreach():
    from autoregembed.run.config import OptimConfig
    from autoregembed.run.session import client_adamw

    g = torch.Generator(device="cuda").manual_seed(0)
    fused = [torch.nn.Parameter(torch.randn(1000, device="cuda", generator=g))]
    plain = [torch.nn.Parameter(fused[0].detach().clone())]
    o = OptimConfig(learning_rate=1e-3, weight_decay=0.01)
    opts = [client_adamw(fused, o, on_cuda=True), torch.optim.AdamW(plain, lr=1e-3, weight_decay=0.01, foreach=True)]
    assert opts[0].defaults["fused"] is True
    for _ in range(3):
        grad = torch.randn(1000, device="cuda", generator=g)
        for p, opt in zip((fused[0], plain[0]), opts):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)


def test_packed_passes_run_a_flash_kernel_and_match_padded_sdpa(tiny_base):
    """On CUDA, model.packing with attn auto (no flash-attn: torch's varlen flash kernel) gives the
    padded SDPA pass's loss within bf16 rounding, and the profiler sees a flash kernel run."""
    from torch.profiler import ProfilerActivity, profile

    from autoregembed.method.batches import compression_batch, to_device
    from autoregembed.run.loading import load_model, resolve_attention
    from autoregembed.method.losses import CompressionLoss
    from autoregembed.method.tokenization import TextEncoder

    attn, _ = resolve_attention("auto", packing=True)
    padded, tok = load_model(tiny_base, tiny_base, 3, torch.bfloat16, "sdpa")
    packed, _ = load_model(tiny_base, tiny_base, 3, torch.bfloat16, attn, packed=True)
    packed.encoder.load_state_dict(padded.encoder.state_dict())
    rows = [{"context": t, "instruction": "Reconstruct the original text.", "output": t}
            for t in ["a man plays a guitar on the stage tonight .", "cats", "stocks fell sharply today ."]]
    batch = to_device(compression_batch(rows, TextEncoder(tok, 3)), "cuda")
    losses = []
    for model in (padded.cuda(), packed.cuda()):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            losses.append(CompressionLoss()(model(batch), batch))
            losses[-1].backward()
        torch.cuda.synchronize()
        if model is packed:
            kernels = {e.key.lower() for e in prof.key_averages()}
            assert any("flash" in k for k in kernels), sorted(kernels)[:40]
    torch.testing.assert_close(losses[1].float(), losses[0].float(), rtol=2e-2, atol=2e-2)
