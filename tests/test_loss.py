import pytest
import torch
import torch.nn.functional as F

from seq2seq.loss import smoothed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_and_gradient_match_pytorch_reference(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (64,), generator=g)
    target[::7] = 0  # padding, ignored
    ours = smoothed_cross_entropy(logits, target, smoothing, ignore_index=0)
    ref = F.cross_entropy(logits, target, ignore_index=0, label_smoothing=smoothing, reduction="sum")
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, atol=1e-10)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert g_ours[::7].abs().max() == 0


def test_gradcheck():
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, 0, 3, 6, 5])
    assert torch.autograd.gradcheck(lambda x: smoothed_cross_entropy(x, target, 0.2, ignore_index=0), (logits,))


def test_bf16_logits_give_bf16_gradient_close_to_fp32():
    logits = torch.randn(32, 100)
    target = torch.randint(0, 100, (32,))
    low = logits.bfloat16().requires_grad_()
    loss = smoothed_cross_entropy(low, target, 0.1)
    loss.backward()
    ref = F.cross_entropy(low.detach().float(), target, label_smoothing=0.1, reduction="sum")
    assert low.grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref)) < 1e-3


@pytest.mark.parametrize("scale", [1.0, 1 / 37])
def test_gradient_scale_hint_never_changes_the_gradient(scale):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 9, generator=g, requires_grad=True)
    target = torch.randint(0, 9, (37,), generator=g)
    grads = []
    for hint in (1.0, 1 / 37, 0.5):
        (grad,) = torch.autograd.grad(smoothed_cross_entropy(logits, target, 0.1, grad_scale=hint) * scale, logits)
        grads.append(grad)
    ref = torch.autograd.grad(F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum") * scale, logits)[0]
    for grad in grads:
        assert torch.allclose(grad, ref, atol=1e-6)


def test_chunks_cover_every_row_of_a_small_vocabulary():
    # a character vocabulary: many rows a chunk; rows beyond the first chunk must count too
    logits = torch.randn(10_000, 65, dtype=torch.float64)
    target = torch.randint(0, 65, (10_000,))
    ours = smoothed_cross_entropy(logits, target)
    assert torch.allclose(ours, F.cross_entropy(logits, target, reduction="sum"))
