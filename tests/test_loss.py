"""The chunked output layer + loss against the plain one (F.linear then F.cross_entropy + PaLM's
z-loss, model/loss.py's readable reference) and against the formulas written out here."""

import pytest
import torch
import torch.nn.functional as F

import burrow.model.loss as loss_module
from burrow import ModelConfig, Transformer
from burrow.model.loss import linear_distillation_loss, plain_loss, resolve_kernel


def linear_cross_entropy(hidden, weight, labels, *, scale=1.0, z_loss=0.0):
    """The chunked kernel's (loss, cross_entropy) without a teacher."""
    loss, cross_entropy, _ = linear_distillation_loss(hidden, weight, labels, None, scale=scale,
                                                      z_loss=z_loss)
    return loss, cross_entropy


def reference(hidden, weight, labels, scale, z_loss):
    logits = (hidden @ weight.T) * scale
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=-100)
    log_z = torch.logsumexp(logits[labels != -100], dim=-1)
    return cross_entropy + z_loss * log_z.pow(2).mean(), cross_entropy


def problem(seed: int, rows: int, every: int):
    """float64 hidden states (rows, 16) and an output matrix (300, 16) that want gradients, and
    labels with -100 at every `every`-th position."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 300, (rows,), generator=generator)
    labels[::every] = -100
    return hidden, weight, labels, generator


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so that a batch spans several chunks and a ragged last one."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 7 * 8 * 300)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_values_and_gradients_equal_the_unfused_loss(small_chunks, z_loss, scale):
    hidden, weight, labels, _ = problem(0, 50, 6)
    loss, cross_entropy = linear_cross_entropy(hidden, weight, labels, scale=scale,
                                               z_loss=z_loss)
    expected_loss, expected_cross_entropy = reference(hidden, weight, labels, scale, z_loss)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(cross_entropy, expected_cross_entropy, rtol=1e-13, atol=0)
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))  # upstream gradient 3
    expected = torch.autograd.grad(expected_loss * 3.0, (hidden, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_with_a_teacher_the_loss_mixes_labels_and_teacher_probabilities(small_chunks, z_loss):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher_logits = 3 * torch.randn(50, 300, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 300, (50,), generator=generator)
    labels[::6] = -100
    loss, cross_entropy, soft = linear_distillation_loss(
        hidden, weight, labels, teacher_logits, scale=0.5, z_loss=z_loss, label_weight=0.75,
        teacher_weight=0.25)
    label_loss, expected_cross_entropy = reference(hidden, weight, labels, 0.5, z_loss)
    logits = (hidden @ weight.T) * 0.5
    per_token = -(teacher_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    expected_soft = per_token[labels != -100].mean()
    expected_loss = 0.75 * label_loss + 0.25 * expected_soft
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(cross_entropy, expected_cross_entropy, rtol=1e-13, atol=0)
    torch.testing.assert_close(soft, expected_soft, rtol=1e-13, atol=0)
    assert not cross_entropy.requires_grad and not soft.requires_grad
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))
    expected = torch.autograd.grad(expected_loss * 3.0, (hidden, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_a_label_weight_alone_scales_the_loss_and_its_gradient(small_chunks):
    hidden = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 8, dtype=torch.float64)
    labels = torch.randint(0, 300, (20,))
    loss, cross_entropy, _ = linear_distillation_loss(hidden, weight, labels, None,
                                                      label_weight=0.5)
    expected, _ = reference(hidden, weight, labels, 1.0, 0.0)
    torch.testing.assert_close(loss, 0.5 * expected)
    torch.testing.assert_close(cross_entropy, expected.detach())
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0],
                               torch.autograd.grad(0.5 * expected, hidden)[0])


def test_without_z_loss_the_cross_entropy_output_carries_the_gradient_too(small_chunks):
    hidden = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 8, dtype=torch.float64)
    labels = torch.randint(0, 300, (20,))
    _, cross_entropy = linear_cross_entropy(hidden, weight, labels)
    expected, _ = reference(hidden, weight, labels, 1.0, 0.0)
    torch.testing.assert_close(torch.autograd.grad(cross_entropy, hidden)[0],
                               torch.autograd.grad(expected, hidden)[0])


def test_with_z_loss_the_cross_entropy_is_a_metric_without_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    _, cross_entropy = linear_cross_entropy(hidden, torch.randn(30, 8),
                                            torch.randint(0, 30, (4,)), z_loss=1e-4)
    assert not cross_entropy.requires_grad


def test_without_autograd_only_the_values_are_computed():
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(30, 8)
    labels = torch.randint(0, 30, (6,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, labels)
        expected, _ = reference(hidden, weight, labels, 1.0, 0.0)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected)


def test_no_targets_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(3, 8), torch.randn(30, 8)
    labels = torch.full((3,), -100)
    loss, _ = linear_cross_entropy(hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, labels))


def test_bf16_autocast_matches_float32_to_bf16_precision():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = (torch.randn(500, 32, generator=generator) * 0.1).requires_grad_()
    labels = torch.randint(0, 500, (64,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, labels)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_loss, _ = reference(hidden, weight, labels, 1.0, 0.0)
    expected = torch.autograd.grad(expected_loss, (hidden, weight))
    assert loss.dtype == torch.float32 and grads[0].dtype == hidden.dtype
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-4)


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_kernel_equals_the_plain_reference(small_chunks, teacher, z_loss):
    hidden, weight, labels, generator = problem(2, 40, 5)
    teacher_logits = (torch.randn(40, 300, dtype=torch.float64, generator=generator)
                      if teacher else None)
    weights = dict(label_weight=0.75, teacher_weight=0.25) if teacher else {}
    chunked = linear_distillation_loss(hidden, weight, labels, teacher_logits, scale=0.5,
                                       z_loss=z_loss, **weights)
    plain = plain_loss(hidden, weight, labels, teacher_logits, scale=0.5, z_loss=z_loss,
                       **weights)
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(chunked[0], (hidden, weight))
    expected = torch.autograd.grad(plain[0], (hidden, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)


def test_the_plain_reference_follows_the_formulas():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(30, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 50, (30,), generator=generator)
    labels[::4] = -100
    loss, cross_entropy, _ = plain_loss(hidden, weight, labels, scale=0.5, z_loss=1e-2)
    expected_loss, expected_cross_entropy = reference(hidden, weight, labels, 0.5, 1e-2)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(cross_entropy, expected_cross_entropy, rtol=1e-12, atol=0)


def test_auto_kernel_is_chunked_on_a_cpu_and_plain_elsewhere():
    assert resolve_kernel("auto", torch.device("cpu")) == "chunked"
    assert resolve_kernel("auto", torch.device("cuda")) == "plain"
    assert resolve_kernel("plain", torch.device("cpu")) == "plain"


def test_the_model_gives_the_same_loss_and_gradients_with_either_kernel():
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for kernel in ("chunked", "plain"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4,
                                        max_seq_len=16, z_loss=1e-4, loss_kernel=kernel))
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), out.cross_entropy, model.head.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
