import math

import pytest
import torch
import torch.nn.functional as F

from prunekit.core.losses import (
    LOSSES,
    causal_lm_loss,
    chunked_causal_lm_loss,
    generalized_jsd_loss,
    get_loss,
)
from tests.conftest import run_in_triton_interpreter


def _labels(b, s, v, gen, frac=0.6):
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[torch.rand(b, s, generator=gen) > frac] = -100
    labels[0, 1] = 5  # at least one supervised target
    return labels


def test_causal_lm_loss_hand_example():
    # B=1, S=4, V=3: positions 0..2 predict labels 1..3; label[2] is ignored.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[7, 0, -100, 1]])  # labels[0] is never a target
    loss_sum, n_tok, n_cor = causal_lm_loss(logits, labels)
    # pos 0 -> target 0 (argmax 0: correct); pos 2 -> target 1 (argmax of a tie is 0: wrong)
    expected = -F.log_softmax(logits[0, 0], -1)[0] - F.log_softmax(logits[0, 2], -1)[1]
    assert n_tok.item() == 2
    assert n_cor.item() == 1
    assert loss_sum.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss_sum.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3), abs=1e-6)


def test_causal_lm_loss_matches_torch_mean():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 17, generator=gen)
    labels = _labels(3, 11, 17, gen)
    loss_sum, n_tok, n_cor = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 17), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n_tok.item() == (labels[:, 1:] != -100).sum().item()
    torch.testing.assert_close(loss_sum / n_tok, ref)
    mask = labels[:, 1:] != -100
    assert n_cor.item() == ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask).sum().item()


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_causal_lm_equals_unchunked(chunk_size):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=gen, requires_grad=True)
    weight = torch.randn(23, 8, generator=gen, requires_grad=True)
    labels = _labels(2, 9, 23, gen)

    ref_sum, ref_n, ref_c = causal_lm_loss(hidden @ weight.T, labels)
    ref_gh, ref_gw = torch.autograd.grad(ref_sum, (hidden, weight))
    got_sum, got_n, got_c = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    got_gh, got_gw = torch.autograd.grad(got_sum, (hidden, weight))

    assert (got_n.item(), got_c.item()) == (ref_n.item(), ref_c.item())
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_gw, ref_gw, rtol=1e-5, atol=1e-5)


def _ref_gjsd(student, teacher, labels, beta, temperature=1.0, top_k=None):
    """Straightforward float64 reference: per supervised position, build both distributions
    explicitly and evaluate the definition with KL(a||b) = sum a * (log a - log b)."""
    v = min(student.shape[-1], teacher.shape[-1])
    total = 0.0
    n = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            s = student[b, t, :v].double() / temperature
            te = teacher[b, t, :v].double() / temperature
            if top_k is not None:
                idx = torch.argsort(te, descending=True)[:top_k]
                s, te = s[idx], te[idx]
            ps, pt = torch.softmax(s, -1), torch.softmax(te, -1)

            def kl(a, c):
                return (a * (a.log() - c.log())).sum()

            if beta == 0:
                total += kl(pt, ps)
            elif beta == 1:
                total += kl(ps, pt)
            else:
                m = beta * pt + (1 - beta) * ps
                total += beta * kl(pt, m) + (1 - beta) * kl(ps, m)
            n += 1
    return torch.as_tensor(total, dtype=torch.float64), n


@pytest.mark.parametrize(
    "beta,temperature,top_k,vs,vt",
    [
        (0.0, 1.0, None, 29, 29),
        (0.5, 1.0, None, 29, 29),
        (1.0, 1.0, None, 29, 29),
        (0.3, 2.0, None, 29, 29),
        (0.5, 1.0, 5, 29, 29),
        (0.0, 2.0, 5, 29, 29),
        (0.5, 1.0, None, 32, 29),  # student vocab padded
        (1.0, 1.0, None, 29, 40),  # teacher vocab padded
    ],
)
def test_generalized_jsd_matches_reference(beta, temperature, top_k, vs, vt):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 7, vs, generator=gen) * 2
    teacher = torch.randn(2, 7, vt, generator=gen) * 2
    labels = _labels(2, 7, 29, gen)
    ref, n_ref = _ref_gjsd(student, teacher, labels, beta, temperature, top_k)
    assert ref.item() > 0.1  # the distributions really differ, so a wrong formula cannot pass by accident

    loss, n = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature, top_k=top_k)
    assert n.item() == n_ref
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_generalized_jsd_is_zero_for_identical_and_differs_between_betas():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 13, generator=gen)
    labels = _labels(2, 6, 13, gen)
    for beta in (0.0, 0.5, 1.0):
        loss, _ = generalized_jsd_loss(logits, logits.clone(), labels, beta=beta)
        assert abs(loss.item()) < 1e-5
    other = torch.randn(2, 6, 13, generator=gen) * 3
    fwd = generalized_jsd_loss(logits, other, labels, beta=0.0)[0]
    rev = generalized_jsd_loss(logits, other, labels, beta=1.0)[0]
    assert abs(fwd.item() - rev.item()) > 1e-3  # forward and reverse KL are not swapped into each other


@pytest.mark.parametrize("beta,top_k", [(0.0, None), (0.5, None), (1.0, 4), (0.5, 4)])
def test_generalized_jsd_chunked_equals_unchunked_with_grad(beta, top_k):
    gen = torch.Generator().manual_seed(4)
    student = (torch.randn(3, 10, 21, generator=gen) * 2).requires_grad_()
    teacher = torch.randn(3, 10, 19, generator=gen) * 2
    labels = _labels(3, 10, 19, gen)

    full, n_full = generalized_jsd_loss(student, teacher, labels, beta=beta, top_k=top_k, temperature=1.5)
    (g_full,) = torch.autograd.grad(full * 0.5, student)
    chunked, n_chunk = generalized_jsd_loss(
        student, teacher, labels, beta=beta, top_k=top_k, temperature=1.5, chunk_size=3
    )
    (g_chunk,) = torch.autograd.grad(chunked * 0.5, student)

    # Gradient reference: plain autograd through the unchunked float math.
    ref = _ref_gjsd(student.detach().double().requires_grad_(), teacher, labels, beta, 1.5, top_k)[0]
    assert n_full.item() == n_chunk.item()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-6)
    assert g_chunk.abs().sum() > 0
    # Unsupervised positions and the padded vocab tail get no gradient.
    assert g_chunk[..., 19:].abs().sum() == 0
    assert g_chunk[:, :-1][labels[:, 1:] == -100].abs().sum() == 0
    with torch.no_grad():
        nograd, _ = generalized_jsd_loss(
            student, teacher, labels, beta=beta, top_k=top_k, temperature=1.5, chunk_size=4
        )
    torch.testing.assert_close(nograd.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_generalized_jsd_gradient_matches_float64_autograd():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 11, generator=gen).double().requires_grad_()
    teacher = torch.randn(2, 5, 11, generator=gen).double()
    labels = _labels(2, 5, 11, gen)
    ref, _ = _ref_gjsd(student, teacher, labels, 0.5, 1.0, None)
    (g_ref,) = torch.autograd.grad(ref, student)
    s32 = student.float().detach().requires_grad_()
    got, _ = generalized_jsd_loss(s32, teacher.float(), labels, chunk_size=2)
    assert got.requires_grad
    (g_got,) = torch.autograd.grad(got, s32)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_generalized_jsd_rejects_bad_args():
    x = torch.randn(1, 4, 8)
    labels = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(x, x, labels, beta=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generalized_jsd_loss(x, x, labels, top_k=9)
    with pytest.raises(ValueError, match="disagree"):
        generalized_jsd_loss(x, torch.randn(1, 5, 8), labels)


def test_no_supervised_tokens_gives_zero():
    x = torch.randn(2, 4, 8)
    labels = torch.full((2, 4), -100)
    assert causal_lm_loss(x, labels)[0].item() == 0 and causal_lm_loss(x, labels)[1].item() == 0
    loss, n = generalized_jsd_loss(x, x + 1, labels, chunk_size=3)
    assert loss.item() == 0 and n.item() == 0


def test_registry():
    assert get_loss("causal_lm") is causal_lm_loss
    assert get_loss("generalized_jsd") is generalized_jsd_loss
    assert set(LOSSES) >= {"causal_lm", "chunked_causal_lm", "generalized_jsd"}
    with pytest.raises(ValueError) as err:
        get_loss("no_such_loss")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'no_such_loss'" in msg and "causal_lm, chunked_causal_lm, chunked_generalized_jsd" in msg


def test_chunked_jsd_from_hidden_equals_logits_version():
    """The hidden-state KD (what distillation trains with) equals generalized_jsd_loss on full logits, with its
    gradient (closed form there, autograd here), and its CE / accuracy equal causal_lm_loss; the teacher's vocab
    has 3 padding rows."""
    from prunekit.core.losses import causal_lm_loss, chunked_generalized_jsd_loss, generalized_jsd_loss
    g = torch.Generator().manual_seed(3)
    b, s, h, v = 2, 7, 16, 40
    hs = torch.randn(b, s, h, generator=g, requires_grad=True)
    ws = torch.randn(v, h, generator=g, requires_grad=True)
    ht, wt = torch.randn(b, s, 24, generator=g), torch.randn(v + 3, 24, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :3] = -100
    for beta, top_k in ((0.0, None), (0.5, None), (1.0, None), (0.0, 5), (0.5, 5), (1.0, 5)):
        loss, kd, ce, n, correct = chunked_generalized_jsd_loss(hs, ws, ht, wt, labels, beta=beta, temperature=2.0,
                                                                top_k=top_k, chunk_size=3, sft_alpha=0.3)
        ref_kd, ref_n = generalized_jsd_loss(hs @ ws.T, ht @ wt.T, labels, beta=beta, temperature=2.0, top_k=top_k)
        ref_ce, _, ref_correct = causal_lm_loss(hs @ ws.T, labels)
        assert torch.allclose(kd, ref_kd, atol=1e-4) and int(n) == int(ref_n) and int(correct) == int(ref_correct)
        assert torch.allclose(ce, ref_ce, atol=1e-4) and torch.allclose(loss, ref_kd + 0.3 * ref_ce, atol=1e-4)
        g1 = torch.autograd.grad(2.0 * loss, (hs, ws))
        g2 = torch.autograd.grad(2.0 * (ref_kd + 0.3 * ref_ce), (hs, ws))
        assert all(torch.allclose(a, c, atol=1e-4) for a, c in zip(g1, g2))
        with torch.no_grad():  # the eval path (no autograd) gives the same numbers
            e_loss, e_kd, *_ = chunked_generalized_jsd_loss(hs, ws, ht, wt, labels, beta=beta, temperature=2.0,
                                                            top_k=top_k, chunk_size=3, sft_alpha=0.3)
        assert torch.allclose(e_loss, loss) and torch.allclose(e_kd, kd)


def test_row_loss_compiled_path_matches_eager():
    # the GPU path (torch.compile'd: logsumexp + hits from the row max) against the eager path (max + argmax hits)
    from prunekit.core.losses.ce import _ce_rows
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(64, 300, generator=g), torch.randint(0, 300, (64,), generator=g)
    target[:8] = logits[:8].argmax(-1)   # some hits to count
    eager = _ce_rows(logits.clone(), None, target)
    compiled = torch.compile(_ce_rows, dynamic=True, backend="aot_eager")(logits.clone(), None, target)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert compiled[2].item() == eager[2].item() == (logits.argmax(-1) == target).sum().item() >= 8


def _kernel_matches_eager(dtype_name: str) -> None:
    from prunekit.core.losses import triton_rows
    from prunekit.core.losses.ce import _ce_rows
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    vocab = 2 * triton_rows.BLOCK + 123
    logits = (3 * torch.randn(6, vocab, generator=g)).to(dtype)
    target = torch.randint(0, vocab, (6,), generator=g)
    target[:2] = logits[:2].float().argmax(-1)
    logits[2, target[2]] = logits[2].float().max()   # a tie with the row max
    eager_loss, eager_grad, _ = _ce_rows(logits.clone(), None, target)
    buffer = logits.clone()
    loss, grad, hits = triton_rows.ce_rows_triton(buffer, None, target)
    assert grad.data_ptr() == buffer.data_ptr() and grad.dtype == dtype
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)
    peak = logits.float().amax(-1)
    assert hits.item() == (logits.float().gather(-1, target[:, None]).squeeze(-1) >= peak).sum().item() >= 3


def _kernel_in_fused_linear_loss() -> None:
    from prunekit.core.losses.ce import FusedLinearLoss
    from prunekit.core.losses.triton_rows import ce_rows_triton
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(700, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 700, (10,), generator=g)
    loss, hits = FusedLinearLoss.apply(h, w, None, target, 4, ce_rows_triton)
    ref = F.cross_entropy(h @ w.T, target, reduction="sum")
    torch.testing.assert_close(loss, ref)
    assert hits.item() == ((h @ w.T).argmax(-1) == target).sum().item()
    for got, want in zip(torch.autograd.grad(3.0 * loss, (h, w)), torch.autograd.grad(3.0 * ref, (h, w))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_row_loss_triton_kernel_matches_eager(dtype_name):
    """The one-kernel row loss (Triton's interpreter here; CUDA on a GPU) against the eager path: loss, gradient
    (written over the logits) and hits, for rows spanning two kernel blocks and a partial third, with a tie at the
    row max counted as a hit as the compiled path counts it."""
    run_in_triton_interpreter("tests.core.test_losses", "_kernel_matches_eager", dtype_name)


def test_row_loss_triton_kernel_in_the_fused_linear_loss():
    """As the fused linear loss's row loss (chunks of 4 rows), the kernel gives autograd's loss, hits and gradients."""
    run_in_triton_interpreter("tests.core.test_losses", "_kernel_in_fused_linear_loss")


def test_row_loss_triton_kernel_says_where_it_cannot_run():
    from prunekit.core.losses import triton_rows
    from prunekit.core.triton_support import unavailable
    assert "run on CUDA" in unavailable(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        triton_rows.ce_rows_triton(torch.zeros(2, 3, 4), None, torch.zeros(2, dtype=torch.long))
    hidden, weight = torch.randn(1, 3, 4, requires_grad=True), torch.randn(5, 4)
    labels = torch.tensor([[-100, 1, 2]])
    with pytest.raises(ValueError, match="row_loss triton: Triton kernels run on CUDA"):
        chunked_causal_lm_loss(hidden, weight, labels, row_loss="triton")
    with pytest.raises(ValueError, match="row_loss: expected one of auto, compiled, triton, got 'fused'"):
        chunked_causal_lm_loss(hidden, weight, labels, row_loss="fused")


def test_row_loss_auto_takes_the_kernel_on_cuda_only():
    """The default row loss: the Triton kernel for rows on CUDA (where Triton comes with torch), the compiled rows
    elsewhere, so a CPU run never asks for Triton."""
    from prunekit.core.losses.ce import ce_row_loss
    from prunekit.core.losses.triton_rows import ce_rows_triton
    from prunekit.core.triton_support import triton
    assert (ce_row_loss("auto", torch.device("cuda")) is ce_rows_triton) == (triton is not None)
    assert ce_row_loss("auto", torch.device("cpu")) is not ce_rows_triton
    hidden, weight = torch.randn(1, 3, 4, requires_grad=True), torch.randn(5, 4)
    loss, n, hits = chunked_causal_lm_loss(hidden, weight, torch.tensor([[-100, 1, 2]]))   # the default, on CPU
    assert n.item() == 2 and torch.isfinite(loss)


def test_hidden_state_loss_compares_directions_at_supervised_positions():
    """1 - cosine per supervised position, averaged over layer pairs and summed over positions: a student vector
    scaled by any positive factor costs nothing (a cut model's outsized sink activation cannot swamp the loss), an
    opposite one costs 2, and positions whose next label is ignored are left out."""
    from prunekit.core.losses import hidden_state_loss
    torch.manual_seed(0)
    t = torch.randn(1, 4, 8)
    labels = torch.tensor([[5, 6, -100, 7]])   # positions 0 and 2 predict supervised labels, 1 does not
    scaled = t * torch.tensor([1.0, 3.0, 0.5, 1e4]).view(1, 4, 1)
    assert hidden_state_loss([scaled], [t], labels).item() == pytest.approx(0.0, abs=1e-6)
    flipped = t.clone()
    flipped[0, 2] = -t[0, 2]
    flipped[0, 1] = -t[0, 1]   # not supervised: no cost
    assert hidden_state_loss([flipped, t], [t, t], labels).item() == pytest.approx(2.0 / 2, abs=1e-5)
    with pytest.raises(ValueError, match="one pair per layer"):
        hidden_state_loss([t], [], labels)


def test_supervised_rows_read_the_labels_host_copy_when_they_carry_one():
    """Device labels that carry their host copy (engine.loop._to) are searched on the host, which a GPU would not
    wait for: the rows and targets are those the labels themselves give; the copy is what is searched."""
    from prunekit.core.losses.ce import HOST_COPY, supervised_rows
    labels = torch.tensor([[5, -100, 7, 8], [-100, 9, -100, 4]])
    rows, target = supervised_rows(labels, -100)
    assert rows.tolist() == [1, 2, 4, 6] and target.tolist() == [7, 8, 9, 4]
    on_device = labels.clone()
    setattr(on_device, HOST_COPY, labels)
    assert [t.tolist() for t in supervised_rows(on_device, -100)] == [[1, 2, 4, 6], [7, 8, 9, 4]]
    setattr(on_device, HOST_COPY, torch.full_like(labels, -100))   # proof the copy, not the tensor, is read
    assert supervised_rows(on_device, -100)[0].tolist() == []
