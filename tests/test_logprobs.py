"""The log-likelihood scorer (PyTorch and Triton row statistics) against float64."""
import pytest
import torch

from autoregembed.method import logprobs
from autoregembed.method.logprobs import IGNORE_INDEX, sequence_logprobs, token_logprobs
from autoregembed.method.scorers import scorer_for

# The kernel runs compiled on CUDA tensors where there is a GPU, else in Triton's interpreter on CPU
# tensors (conftest.py turns it on before anything imports kernels).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(m=253, v=507, d=123, dtype=torch.float32, peaked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g)
    w = torch.randn(v, d, generator=g) * (0.3 if not peaked else 3.0)
    y = torch.randint(0, v, (m,), generator=g)
    if peaked:  # make most targets the argmax by a wide margin: softmax close to one-hot
        w[y[: m // 2]] += 4.0 * h[: m // 2] / h[: m // 2].norm(dim=1, keepdim=True)
    return h.to(dtype), w.to(dtype), y


def _reference(h, w, y, g):
    """float64 log_softmax(H W^T)[y] and its gradient w.r.t. H."""
    h64 = h.double().requires_grad_()
    lp = torch.log_softmax(h64 @ w.double().T, -1).gather(1, y[:, None])[:, 0]
    (lp * g.double()).sum().backward()
    return lp.detach(), h64.grad


def _same_dtype_error(h, w, y, g, ref_lp, ref_grad):
    """Error of the naive PyTorch path in the inputs' own dtype: the bar to meet.

    Ours must stay within twice that error (plus a small absolute tolerance): both are
    single draws of rounding noise, so "no more than PyTorch's own error" fails by chance
    (seen on AVX-512 machines: 1.48e-4 vs 1.44e-4 on peaked gradients of size ~40)."""
    hh = h.clone().requires_grad_()
    lp = torch.log_softmax((hh @ w.T).float(), -1).gather(1, y[:, None])[:, 0]
    (lp * g).sum().backward()
    return (lp.double() - ref_lp).abs().max().item(), (hh.grad.double() - ref_grad).abs().max().item()


def _count_kernel_calls(monkeypatch):
    import autoregembed.kernels.logit_rows as K

    calls = []
    real = K.logit_row_stats
    monkeypatch.setattr(K, "logit_row_stats", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("scorer", ["torch", "triton", "cce"])
@pytest.mark.parametrize("peaked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scorer_matches_float64(monkeypatch, peaked, scorer, dtype):
    """Every backend (scorers.py) within twice PyTorch's own error in the same dtype; bf16 also
    rounds dZ and the Jacobian.  cut-cross-entropy runs without its gradient filter, so its
    per-token gradients are exact too."""
    calls = _count_kernel_calls(monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    h, w, y = _problem(peaked=peaked, dtype=dtype)
    g = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1))
    ref_lp, ref_grad = _reference(h, w, y, g)
    lp_err, grad_err = _same_dtype_error(h, w, y, g, ref_lp, ref_grad)
    hh = h.clone().requires_grad_()
    # 60 rows with a Jacobian: 4 full chunks and a partial one (not a multiple of 64); 120 without (cce: 3)
    monkeypatch.setattr(logprobs, "TILE_BUDGET_BYTES", 60 * w.shape[0] * 8)
    backend = scorer_for(scorer)
    lp = backend.token_logprobs(hh, w, y)
    (lp * g).sum().backward()
    assert lp.dtype == torch.float32
    assert (lp.double() - ref_lp).abs().max().item() <= 2 * lp_err + tol
    assert (hh.grad.double() - ref_grad).abs().max().item() <= 2 * grad_err + tol
    assert hh.grad.dtype == dtype
    assert len(calls) == (5 if scorer == "triton" else 0)
    with torch.no_grad():  # without a gradient: the same values (ours: no Jacobian)
        torch.testing.assert_close(backend.token_logprobs(h, w, y), lp.detach(), rtol=0, atol=1e-5)


def test_chunk_rows_fit_the_budget():
    from autoregembed.method.logprobs import chunk_rows

    assert chunk_rows(32000, jacobian=True, budget=256 << 20) == 1024  # 1048 fit, rounded to 64
    assert chunk_rows(32000, jacobian=False, budget=256 << 20) == 2048  # logits only: twice as many
    assert chunk_rows(151936, jacobian=True, budget=1000) == 1  # never zero
    # on a GPU, the Jacobian GEMM's output (rows x d) covers every multiprocessor at least once:
    # at V=128k the budget gives 256 rows, 64 tiles of 128 x 128 for 132 SMs -> 5 x 128 rows
    assert chunk_rows(128256, jacobian=True, budget=256 << 20) == 256
    assert chunk_rows(128256, jacobian=True, budget=256 << 20, d=4096, sms=132) == 640
    assert chunk_rows(32000, jacobian=True, budget=256 << 20, d=4096, sms=132) == 1024  # already enough
    assert chunk_rows(128256, jacobian=False, budget=256 << 20, d=4096, sms=132) == 512  # no second GEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_the_saved_jacobian_in_place(dtype):
    """The gradient handed back is the saved Jacobian's own storage (no [M, D] temporary, fp32 or
    otherwise), with the reference values; a second backward through it is refused."""
    h, w, y = _problem(m=150, v=40, d=24, dtype=dtype)
    g = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3))
    ref_lp, ref_grad = _reference(h, w, y, g)
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    hh = h.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = token_logprobs(hh, w, y)
    (lp * g).sum().backward()
    assert saved and hh.grad.data_ptr() == saved[-1]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (hh.grad.double() - ref_grad).abs().max().item() <= tol * max(1.0, ref_grad.abs().max().item())
    again = token_logprobs(h.clone().requires_grad_(), w, y).sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        again.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_kernel_matches_pytorch_rows(dtype):
    """Odd widths (a partial last block), the last vocabulary entry as a target, and large logits."""
    from autoregembed.kernels.logit_rows import logit_row_stats

    for c, v in [(1, 7), (37, 5000), (5, 9000)]:
        g = torch.Generator().manual_seed(v)
        z = torch.randn(c, v, generator=g) * 8
        y = torch.randint(0, v, (c,), generator=g)
        y[-1] = v - 1
        dz = torch.empty(c, v, dtype=dtype)
        tgt, lse = logit_row_stats(z.to(DEVICE), y.to(DEVICE), dz.to(DEVICE))
        ref_dz = torch.empty(c, v, dtype=torch.float64)
        ref_tgt, ref_lse = logprobs.torch_row_stats(z.double(), y, ref_dz)
        torch.testing.assert_close(tgt.double().cpu(), ref_tgt, rtol=0, atol=0)
        torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 4e-3  # fp32: lse to 1e-6 relative; bf16: rounding
        assert (dz.double().cpu() - ref_dz).abs().max().item() <= tol
    with pytest.raises(ValueError, match="fp32 logits"):
        logit_row_stats(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long))


def test_sequence_sums_skip_ignored_positions():
    torch.manual_seed(1)
    s, t, d, v = 7, 19, 16, 150
    hidden = torch.randn(s, t, d, requires_grad=True)
    w = torch.randn(v, d)
    labels = torch.randint(0, v, (s, t))
    labels[torch.rand(s, t) < 0.2] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX  # a sequence with nothing scored sums to 0
    out = sequence_logprobs(hidden, w, labels, scorer_for("auto"))
    lp = torch.log_softmax(hidden.double() @ w.double().T, -1)
    keep = labels != IGNORE_INDEX
    ref = (lp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * keep).sum(1)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-6)
    assert out[3].item() == 0.0
    out.sum().backward()
    assert hidden.grad[~keep].abs().max().item() == 0.0  # ignored positions get no gradient
    # with the count known on the host (as batches carry it): the same values and gradients
    grad = hidden.grad.clone()
    hidden.grad = None
    counted = sequence_logprobs(hidden, w, labels, scorer_for("auto"), n_scored=int(keep.sum()))
    torch.testing.assert_close(counted, out, rtol=0, atol=0)
    counted.sum().backward()
    torch.testing.assert_close(hidden.grad, grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="scored tokens expected"):  # a wrong count is caught, not truncated
        sequence_logprobs(hidden, w, labels, scorer_for("auto"), n_scored=int(keep.sum()) - 1)


def test_batches_count_their_target_tokens_on_the_host(tiny_base):
    from transformers import AutoTokenizer

    from autoregembed.method.batches import alignment_batch, compression_batch, token_count, to_device
    from autoregembed.method.tokenization import TextEncoder, prepare_tokenizer

    te = TextEncoder(prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_base), 3), 3)
    rows = [{"context": "a b c d", "instruction": "i", "output": "a b c d", "query": "q one", "pos": "p one two",
             "neg": ["n", "n two three four"]}, {"context": "e", "instruction": "i", "output": "e f",
                                                  "query": "q", "pos": "p", "neg": ["m"]}]
    c = compression_batch(rows, te)
    assert c.target_tokens == int(c.target_mask.sum()) and isinstance(c.target_tokens, int)
    a = alignment_batch(rows, te, None).candidates
    assert (a.pos_tokens, a.neg_tokens) == (int(a.pos_mask.sum()), int(a.neg_mask.sum()))
    moved = to_device(c, "cpu")
    assert moved.target_tokens == c.target_tokens and token_count(moved) == token_count(c)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="disagree"):
        sequence_logprobs(torch.randn(2, 3, 4), torch.randn(10, 4), torch.zeros(2, 4, dtype=torch.long),
                          scorer_for("auto"))
    with pytest.raises(ValueError, match="does not match hidden size"):
        token_logprobs(torch.randn(3, 4), torch.randn(10, 5), torch.zeros(3, dtype=torch.long))


def test_labels_outside_the_vocabulary_are_refused():
    """Before any kernel reads logits[row, label] out of bounds."""
    h, w, y = _problem(m=8, v=50, d=16)
    for bad in (50, -1):
        y[3] = bad
        with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary"):
            token_logprobs(h.to(DEVICE), w.to(DEVICE), y.to(DEVICE))
        with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary"):
            scorer_for("cce").token_logprobs(h, w, y)  # every backend: the check is the base class's


@pytest.mark.parametrize("scorer", ["auto", "cce"])
def test_every_backend_sums_the_same_sequences(scorer):
    """sequence_logprobs takes a backend or its name; the packed per-sequence sums and their
    gradients do not depend on which backend scored the tokens."""
    torch.manual_seed(2)
    hidden = torch.randn(5, 11, 16, requires_grad=True)
    w, labels = torch.randn(90, 16), torch.randint(0, 90, (5, 11))
    labels[torch.rand(5, 11) < 0.3] = IGNORE_INDEX
    got = sequence_logprobs(hidden, w, labels, scorer_for(scorer))
    (grad,) = torch.autograd.grad(got.sum(), hidden)
    ref = sequence_logprobs(hidden, w, labels, scorer_for("torch"))
    (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_backends_tell_the_planner_what_they_hold(monkeypatch):
    """What each backend holds (autoregembed plan); a name that is no backend, or cce without its
    package, is a user error naming its scorer.* key before any model loads."""
    import sys

    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.ground.errors import InputError
    from autoregembed.ground.arch import PRESETS, Arch
    from autoregembed.tools.plan import SCORER_KEY, plan

    fused, cce = scorer_for("auto"), scorer_for("cce")
    arch = Arch(*PRESETS["llama-2-7b"])
    ours, theirs = (plan(arch, 8, 3, 4, 7, 512, scorer=s)["breakdown"][SCORER_KEY] for s in ("auto", "cce"))
    tokens = 4 * 9 * (5 + 512 + 1)  # decoder tokens of that micro-batch
    assert ours == fused.held_bytes(tokens, 4096, 32000) and theirs == cce.held_bytes(tokens, 4096, 32000)
    assert theirs < ours < 2 * 4 * tokens * 32000  # neither near the materialised fp32 logits
    assert load_config(None, ["scorer.kind=cce"]).scorer.backend == cce
    assert load_config(None, ["scorer.row_stats=torch"]).scorer.backend == scorer_for("torch")
    with pytest.raises(ConfigError, match="key 'scorer.kind': 'liger' is not one of fused, cce"):
        load_config(None, ["scorer.kind=liger"])
    with pytest.raises(ConfigError, match="key 'scorer.row_stats': 'cuda' is not one of auto, triton, torch"):
        load_config(None, ["scorer.row_stats=cuda"])
    with pytest.raises(ConfigError, match="unknown key 'scorer.row_stats'"):  # a key of the fused kind only
        load_config(None, ["scorer.kind=cce", "scorer.row_stats=torch"])
    with pytest.raises(ConfigError, match="key 'model.scorer' is now 'scorer.kind'"):
        load_config(None, ["model.scorer=cce"])
    with pytest.raises(InputError, match="scorer 'liger' is not one of fused, cce, auto"):
        scorer_for("liger")
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # not installed
    with pytest.raises(ConfigError, match="key 'scorer.kind': 'cce' needs cut-cross-entropy"):
        load_config(None, ["scorer.kind=cce"])
    h, w, y = _problem(m=4, v=20, d=8)
    with pytest.raises(InputError, match="'cce' needs cut-cross-entropy"):
        cce.token_logprobs(h, w, y)


def test_a_new_scorer_backend_is_one_class_and_its_keys():
    """A backend with a setting is one class registered under a kind: its fields become ``scorer.*`` keys
    (checked by its own ``check``, unknown to other kinds), the loader builds it once, and that object is
    what every engine of the run scores with (``RunContext.scorer``)."""
    import dataclasses

    from autoregembed.method.scorers import SCORERS, Scorer, scorer_kind
    from autoregembed.run.config import ConfigError, load_config
    from autoregembed.run.session import RunContext

    saved = dict(SCORERS)

    @scorer_kind("scaled")
    @dataclasses.dataclass(frozen=True)
    class Scaled(Scorer):
        """PyTorch's row statistics, the log-probabilities times ``factor``."""

        factor: float = 1.0

        def check(self, key):
            if self.factor <= 0:
                raise ConfigError(f"key '{key}.factor' must be > 0")

        def _token_logprobs(self, hidden, weight, labels):
            return self.factor * scorer_for("torch").token_logprobs(hidden, weight, labels)

    try:
        backend = RunContext.of(load_config(None, ["scorer.kind=scaled", "scorer.factor=2"]), None).scorer
        assert backend == Scaled(2.0)
        h, w, y = _problem(m=6, v=20, d=8)
        torch.testing.assert_close(sequence_logprobs(h[None], w, y[None], backend),
                                   2 * sequence_logprobs(h[None], w, y[None], scorer_for("torch")))
        with pytest.raises(ConfigError, match="key 'scorer.factor' must be > 0"):
            load_config(None, ["scorer.kind=scaled", "scorer.factor=0"])
        with pytest.raises(ConfigError, match="unknown key 'scorer.factor'"):
            load_config(None, ["scorer.factor=2"])  # the default kind, fused, has no such key
    finally:
        SCORERS.clear()
        SCORERS.update(saved)


def test_kernels_import_changes_no_environment_and_triton_on_cpu_needs_the_interpreter():
    import os

    from helpers import run_child

    code = ("import os, torch\n"
            "import autoregembed.kernels\n"
            "assert 'TRITON_INTERPRET' not in os.environ, 'importing kernels set TRITON_INTERPRET'\n"
            "from autoregembed.method.logprobs import token_logprobs\n"
            "h, w, y = torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long)\n"
            "token_logprobs(h, w, y)  # auto: PyTorch on CPU\n"
            "token_logprobs(h, w, y, scorer='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_child(["-c", code], env=env, timeout=120)
    assert proc.returncode == 1 and "needs Triton's interpreter: set TRITON_INTERPRET=1" in proc.stderr, proc.stderr


def test_an_odd_vocabulary_gets_rows_with_aligned_strides(monkeypatch):
    """V=507: the logits and dZ handed to the row statistics start every row 16 elements aligned
    (what keeps the GPU kernel's loads 16 bytes wide), and the values are unchanged."""
    h, w, y = _problem(m=40, v=507, d=24)
    strides = []

    def recording(logits, labels, dz=None):
        strides.append((logits.stride(0), None if dz is None else dz.stride(0)))
        return logprobs.torch_row_stats(logits, labels, dz)

    monkeypatch.setattr(logprobs, "row_stats_for", lambda scorer, device: recording)
    hh = h.clone().requires_grad_()
    lp = token_logprobs(hh, w, y)
    lp.sum().backward()
    assert strides == [(512, 512)]
    monkeypatch.undo()
    h2 = h.clone().requires_grad_()
    ref = token_logprobs(h2, w, y, scorer="torch")
    ref.sum().backward()
    torch.testing.assert_close(lp, ref, rtol=0, atol=0)
    torch.testing.assert_close(hh.grad, h2.grad, rtol=0, atol=0)


def test_the_public_sequence_logprobs_takes_a_scorer_name_or_backend():
    import autoregembed

    h, w = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)), torch.randn(11, 8)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [7, 7, IGNORE_INDEX]])
    want = sequence_logprobs(h, w, labels, scorer_for("torch"))
    for scorer in ("torch", scorer_for("torch")):
        torch.testing.assert_close(autoregembed.sequence_logprobs(h, w, labels, scorer), want)
    torch.testing.assert_close(autoregembed.sequence_logprobs(h, w, labels), sequence_logprobs(h, w, labels, scorer_for("auto")))
