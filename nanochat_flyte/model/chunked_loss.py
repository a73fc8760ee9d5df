"""The output head's loss a chunk of tokens at a time: lm_head, softcap and cross-entropy without the logits.

The model's plain path computes the logits of every position of a micro-batch at once: at the reference shape
(16 x 512 tokens, GPT-2's 50,257-token vocabulary) that is 8,192 x 50,304 half-precision products, their float32
copy (1.6 GB), the softcap's output, and what the backward pass keeps of them. Here at most one chunk's logits exist
at once, in one of two ways:

- a mean or a sum that gradients will flow from (training's loss): the forward pass computes the loss and, while
  the chunk's logits are at hand, its gradients with respect to the head's input and weight; the backward pass
  only scales them by the incoming gradient (a scalar). The head's FLOPs stay the plain path's 3 products of the
  logits' size, and the logits are read twice (loss, gradient) instead of the plain path's three passes;
- per-token losses (evaluation, RL's advantage weights): the forward pass keeps each token's log-sum-exp (4 bytes
  a token) and the backward pass recomputes the logits, for a fourth product of the logits' size.

The arithmetic is the plain path's: the product in the autocast dtype (or the input's), the softcap and the
cross-entropy in float32, the gradient of the logits cast back to the product's dtype before the two backward
products. Targets of -1 are ignored (loss 0, no gradient), as F.cross_entropy's ignore_index=-1.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def softcapped_logits(x: torch.Tensor, weight: torch.Tensor, vocab_size: int, softcap: float) -> torch.Tensor:
    """softcap * tanh(x @ weight.T / softcap) in float32, the padding columns of the vocabulary dropped. In place
    on the float32 copy: no autograd records it (autograd.Function), and a chunk's logits are the largest tensors."""
    logits = F.linear(x, weight)[:, :vocab_size].float()
    return logits.div_(softcap).tanh_().mul_(softcap)


def token_losses(capped: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses, log-sum-exps) of one chunk's capped logits; an ignored target's loss is 0."""
    log_sum_exp = torch.logsumexp(capped, dim=-1)
    target_logit = capped.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets == IGNORE_INDEX, 0.0, log_sum_exp - target_logit), log_sum_exp


def logits_gradient(capped: torch.Tensor, log_sum_exp: torch.Tensor, targets: torch.Tensor,
                    grad_losses: torch.Tensor, softcap: float, padded_vocab_size: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """d sum(grad_losses * losses) / d logits of one chunk, (n, padded_vocab_size) in dtype. Overwrites capped."""
    grad_loss = torch.where(targets == IGNORE_INDEX, 0.0, grad_losses)[:, None]
    # d loss / d capped logit = softmax - one-hot(target)
    grad_capped = (capped - log_sum_exp[:, None]).exp_().mul_(grad_loss)
    grad_capped.scatter_add_(1, targets.clamp(min=0)[:, None], -grad_loss)
    # d softcap(z) / dz = 1 - tanh(z / softcap)^2 = 1 - (capped / softcap)^2
    grad_capped.mul_(capped.div_(softcap).square_().neg_().add_(1))
    grad_logits = grad_capped.new_zeros(capped.size(0), padded_vocab_size, dtype=dtype)  # padding columns: 0
    grad_logits[:, :capped.size(1)] = grad_capped
    return grad_logits


def chunk_starts(num_tokens: int, chunk_tokens: int) -> range:
    """Where each chunk starts; one empty chunk when there are no tokens (a batch whose targets are all ignored),
    so that the results keep their shapes."""
    return range(0, max(num_tokens, 1), chunk_tokens)


class ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """Per-token losses (N,) of x (N, D) through the head weight (V_padded, D), chunk_tokens rows at a time."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, chunk_tokens: int, dtype: torch.dtype):
        w = weight.to(dtype)
        losses, log_sum_exps = [], []
        for start in chunk_starts(x.size(0), chunk_tokens):
            capped = softcapped_logits(x[start:start + chunk_tokens].to(dtype), w, vocab_size, softcap)
            chunk_losses, log_sum_exp = token_losses(capped, targets[start:start + chunk_tokens])
            losses.append(chunk_losses)
            log_sum_exps.append(log_sum_exp)
        ctx.save_for_backward(x, weight, targets, torch.cat(log_sum_exps))
        ctx.vocab_size, ctx.softcap, ctx.chunk_tokens, ctx.dtype = vocab_size, softcap, chunk_tokens, dtype
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, targets, log_sum_exp = ctx.saved_tensors
        vocab_size, softcap, chunk_tokens, dtype = ctx.vocab_size, ctx.softcap, ctx.chunk_tokens, ctx.dtype
        w = weight.to(dtype)
        grad_x = []
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # summed over chunks in float32
        for start in chunk_starts(x.size(0), chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            x_chunk = x[chunk].to(dtype)
            grad_logits = logits_gradient(softcapped_logits(x_chunk, w, vocab_size, softcap), log_sum_exp[chunk],
                                          targets[chunk], grad_losses[chunk], softcap, weight.size(0), dtype)
            grad_x.append((grad_logits @ w).to(x.dtype))
            grad_weight.add_(grad_logits.t() @ x_chunk)
        return torch.cat(grad_x), grad_weight.to(weight.dtype), None, None, None, None, None


class FusedSoftcapCrossEntropy(torch.autograd.Function):
    """scale x the sum of the per-token losses of x (N, D) through the head weight (V_padded, D), chunk_tokens rows
    at a time, its gradients computed in the forward pass (scale: 1, or 1 / the number of counted targets)."""

    @staticmethod
    def forward(ctx, x, weight, targets, scale, vocab_size: int, softcap: float, chunk_tokens: int,
                dtype: torch.dtype):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = []
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # summed over chunks in float32
        for start in chunk_starts(x.size(0), chunk_tokens):
            x_chunk, chunk_targets = x[start:start + chunk_tokens].to(dtype), targets[start:start + chunk_tokens]
            capped = softcapped_logits(x_chunk, w, vocab_size, softcap)
            chunk_losses, log_sum_exp = token_losses(capped, chunk_targets)
            total += chunk_losses.sum()
            # Every counted token's gradient at weight 1, its entries within [-1, 1], for the 16-bit products; the
            # scale (1/8,192 for a mean over 16 x 512 tokens) follows in float32, where fp16 would flush the
            # gradients of most logits to zero.
            grad_logits = logits_gradient(capped, log_sum_exp, chunk_targets, torch.ones_like(log_sum_exp), softcap,
                                          weight.size(0), dtype)
            grad_x.append((grad_logits @ w).float())
            grad_weight.add_(grad_logits.t() @ x_chunk)
        ctx.save_for_backward(torch.cat(grad_x).mul_(scale), grad_weight.mul_(scale))
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_weight = ctx.saved_tensors
        return ((grad_x * grad_total).to(ctx.x_dtype), (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                          softcap: float, chunk_tokens: int, reduction: str = "mean") -> torch.Tensor:
    """The softcapped cross-entropy of x (..., D) through the head `weight` against targets (...), as
    F.cross_entropy(..., ignore_index=-1, reduction=reduction) of the plain path's logits computes it."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        scale = 1.0 if reduction == "sum" else 1 / (flat_targets != IGNORE_INDEX).sum()
        return FusedSoftcapCrossEntropy.apply(x, weight, flat_targets, scale, vocab_size, softcap, chunk_tokens,
                                              dtype)
    losses = ChunkedSoftcapCrossEntropy.apply(x, weight, flat_targets, vocab_size, softcap, chunk_tokens, dtype)
    if reduction == "none":
        return losses.view_as(targets)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != IGNORE_INDEX).sum()  # the mean over the targets that count
