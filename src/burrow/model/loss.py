"""The output layer and its loss in one pass: logits, cross-entropy and z-loss, chunk by chunk.

Written plainly, the last layer materialises (tokens x vocabulary) logits, log-softmaxes them,
and autograd then writes a zero tensor of the same size, scatters -1 into it and runs the
log-softmax backward: four passes over the largest activation of a small model (for 2,048
tokens and a 8,192 vocabulary, 67 MB each). Here the tokens are taken a few hundred rows at a
time, so a chunk's logits stay in cache: its loss and the gradient of the loss with respect to
its logits, softmax - one_hot, are computed at once, and turned into the gradients of the
hidden states and of the output matrix before the next chunk (as Liger Kernel's fused linear
cross-entropy does). Backward only scales what forward computed. The numbers are those of
`F.cross_entropy` over `F.linear` up to floating-point summation order.

Distillation (Switch §4) mixes a second target into the same pass: a teacher's probabilities,
cross-entropy against them being log Z - sum_v p_v logit_v, whose gradient is softmax - p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk: a chunk's float32 logits take at most this many bytes (they must fit in a
# CPU's last-level cache; on a GPU it bounds the memory the loss adds).
CHUNK_BYTES = 8 * 2**20


class LinearCrossEntropy(torch.autograd.Function):
    """label_weight x (mean cross-entropy + z_loss * mean(log^2 Z)) + teacher_weight x mean
    cross-entropy against softmax(teacher_logits), of logits = scale * hidden @ weight^T.

    Returns (loss, cross_entropy, soft_cross_entropy): the objective and, as metrics, its parts
    (the last zero without a teacher). Gradients flow through `loss` only; with neither z-loss
    nor teacher the first two are the same tensor.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                scale: float, z_loss: float, need_grads: bool,
                teacher_logits: torch.Tensor | None, label_weight: float, teacher_weight: float):
        # hidden (N, d), weight (V, d), labels (N,) with -100 where there is no target,
        # teacher_logits (N, V) or None
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        device = hidden.device.type
        # The dtype the matmuls run in: autocast's (bf16 on a GPU) or the tensors' own.
        compute = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                   else hidden.dtype)
        exact = torch.promote_types(compute, torch.float32)  # softmax and sums: fp32 or more
        valid = labels != -100
        count = valid.sum().to(exact)
        cross_entropy_sum = torch.zeros((), device=hidden.device, dtype=exact)
        z_sum = torch.zeros_like(cross_entropy_sum)
        soft_sum = torch.zeros_like(cross_entropy_sum)
        if need_grads:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=exact)
            weight_compute = weight.to(compute)
        # One buffer for every chunk's logits: a fresh allocation this size would be new pages
        # from the OS each time, and their page faults cost as much as the arithmetic.
        buffer = torch.empty(min(rows, hidden.shape[0]), weight.shape[0], dtype=exact,
                             device=hidden.device)
        teacher_buffer = torch.empty_like(buffer) if teacher_logits is not None else None
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start:start + rows]
            targets = labels[start:start + rows].clamp(min=0)[:, None]  # (n, 1)
            mask = valid[start:start + rows]
            logits = buffer[:chunk.shape[0]]  # (n, V)
            if compute == exact:
                torch.mm(chunk, weight.t(), out=logits)
            else:
                logits.copy_(F.linear(chunk, weight))
            if scale != 1.0:
                logits.mul_(scale)
            picked = logits.gather(1, targets)[:, 0]
            if teacher_buffer is not None:
                teacher_probs = teacher_buffer[:chunk.shape[0]]
                teacher_probs.copy_(teacher_logits[start:start + rows])
                teacher_probs.sub_(teacher_probs.amax(dim=-1, keepdim=True)).exp_()
                teacher_probs.div_(teacher_probs.sum(dim=-1, keepdim=True))
                # (n,) sum_v p_v logit_v: one dot product per row, no (n, V) temporary
                expected_logit = torch.bmm(teacher_probs[:, None, :], logits[:, :, None])[:, 0, 0]
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()  # in place: the logits are not needed again
            sums = exps.sum(dim=-1)
            log_z = sums.log() + row_max[:, 0]  # (n,) log of the softmax normaliser Z
            cross_entropy_sum += ((log_z - picked) * mask).sum()
            z_sum += (log_z.square() * mask).sum()
            if teacher_buffer is not None:
                soft_sum += ((log_z - expected_logit) * mask).sum()
            if not need_grads:
                continue
            # d/dlogits of a (ce + z_loss log^2 Z) + b soft_ce with a = label_weight and
            # b = teacher_weight: softmax (a (1 + 2 z_loss log Z) + b) - a one_hot - b p,
            # times the chain rule's scale and 1/count of the mean.
            weight_of_row = mask * (scale / count.clamp(min=1))
            softmax_factor = weight_of_row / sums * label_weight
            if z_loss:
                softmax_factor = softmax_factor * (1 + 2 * z_loss * log_z)
            if teacher_buffer is not None:
                softmax_factor = softmax_factor + weight_of_row / sums * teacher_weight
            grad_logits = exps.mul_(softmax_factor[:, None])
            grad_logits.scatter_add_(1, targets,
                                     -(label_weight * weight_of_row)[:, None].to(exact))
            if teacher_buffer is not None:
                grad_logits.addcmul_(teacher_probs, (-teacher_weight * weight_of_row)[:, None])
            grad_logits, chunk = grad_logits.to(compute), chunk.to(compute)
            grad_hidden[start:start + rows] = grad_logits @ weight_compute
            if compute == exact:
                grad_weight.addmm_(grad_logits.t(), chunk)
            else:
                grad_weight += grad_logits.t() @ chunk
        cross_entropy = cross_entropy_sum / count
        soft_cross_entropy = soft_sum / count
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        if not z_loss and teacher_logits is None and label_weight == 1.0:
            ctx.mark_non_differentiable(soft_cross_entropy)
            return cross_entropy, cross_entropy.clone(), soft_cross_entropy
        ctx.mark_non_differentiable(cross_entropy, soft_cross_entropy)
        loss = label_weight * (cross_entropy + z_loss * z_sum / count)
        return loss + teacher_weight * soft_cross_entropy, cross_entropy, soft_cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_cross_entropy: torch.Tensor,
                 grad_soft_cross_entropy: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # With no z-loss, teacher or label weight the first two outputs are the loss, and their
        # gradients add up; otherwise the others are metrics, and their gradients are zero.
        grad = grad_loss + grad_cross_entropy
        return grad_hidden * grad, grad_weight * grad, None, None, None, None, None, None, None


def linear_distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             teacher_logits: torch.Tensor | None, *, scale: float = 1.0,
                             z_loss: float = 0.0, label_weight: float = 1.0,
                             teacher_weight: float = 0.0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross_entropy, soft_cross_entropy): label_weight x (cross-entropy + z-loss) +
    teacher_weight x the cross-entropy against softmax(teacher_logits (..., V)), in one pass.

    Means are over the positions with a target; the teacher is a fixed target (no gradient).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels.reshape(-1), scale, z_loss,
                                    need_grads, teacher_logits, label_weight, teacher_weight)


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               teacher_logits: torch.Tensor | None = None, *, scale: float = 1.0,
               z_loss: float = 0.0, label_weight: float = 1.0, teacher_weight: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same three numbers as `linear_distillation_loss`, written plainly: all logits at
    once, then F.cross_entropy, PaLM's z-loss (§5: z_loss * log^2 Z) and the cross-entropy
    against the teacher's probabilities. The readable reference of the chunked kernel, and the
    kernel where that one is not measured faster (model.loss_kernel)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    logits = F.linear(hidden, weight) * scale  # (N, V), in float32 or wider
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != -100
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=-100)
    log_z = torch.logsumexp(logits, dim=-1)[valid]
    loss = cross_entropy + z_loss * log_z.square().mean() if z_loss else cross_entropy
    soft_cross_entropy = torch.zeros((), device=hidden.device, dtype=logits.dtype)
    if teacher_logits is not None:
        teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(logits.dtype)
        soft = -(teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        soft_cross_entropy = soft[valid].mean()
    if teacher_logits is not None or label_weight != 1.0:
        loss = label_weight * loss + teacher_weight * soft_cross_entropy
    return loss, cross_entropy.detach(), soft_cross_entropy.detach()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """model.loss_kernel with "auto" resolved: the chunked kernel on a CPU, where it is measured
    faster (BENCHMARKS.md); the plain one elsewhere, until measured there (on a GPU the chunked
    kernel holds a float32 (V, d) gradient from forward to backward: ~19 GB at PaLM-540B)."""
    if kernel != "auto":
        return kernel
    return "chunked" if device.type == "cpu" else "plain"


def output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                kernel: str, teacher_logits: torch.Tensor | None = None, scale: float = 1.0,
                z_loss: float = 0.0, label_weight: float = 1.0, teacher_weight: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross_entropy, soft_cross_entropy) by the kernel model.loss_kernel names."""
    compute = (linear_distillation_loss
               if resolve_kernel(kernel, hidden.device) == "chunked" else plain_loss)
    return compute(hidden, weight, labels, teacher_logits, scale=scale, z_loss=z_loss,
                   label_weight=label_weight, teacher_weight=teacher_weight)


class LanguageModelLoss:
    """The model's own objective: cross-entropy against the labels + PaLM's z-loss.

    An objective is called with the final hidden states (B, T, d), the output matrix (V, d),
    the labels and the model's settings, inside the model's forward (so that a sharded output
    matrix is whole there), and returns (loss, cross_entropy, metrics). Distillation
    (train/distill.py) brings its own.
    """

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 scale: float, z_loss: float, kernel: str
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss, cross_entropy, _ = output_loss(hidden, weight, labels, kernel=kernel, scale=scale,
                                             z_loss=z_loss)
        return loss, cross_entropy, {}
