"""Optimizers and schedules of nanochat's original recipe.

Muon for the 2-D weight matrices inside the transformer blocks; AdamW for the embedding and the output
head, with learning rates that shrink as the model widens, and for the residual scalars when the model has
them. The learning rate is flat, then decays linearly over the last part of training; Muon's momentum warms
up over the first 300 steps.
"""

import torch

from nanochat_flyte.config import RunConfig
from nanochat_flyte.model.gpt import GPT

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
LR_REFERENCE_DIM = 768  # the width nanochat's AdamW learning rates were tuned at
# The residual scalars multiply the whole residual stream, and a change compounds through the layers: nanochat
# found they need about 1/100 of the learning rate of the x0 scalars, which only add a fraction of the embedding.
RESID_LAMBDA_LR_FRACTION = 0.01
MUON_MOMENTUM_START, MUON_MOMENTUM_END, MUON_MOMENTUM_WARMUP_STEPS = 0.85, 0.95, 300
# Quintic Newton-Schulz coefficients from Keller Jordan's Muon write-up: they push every singular value
# into roughly [0.7, 1.2] in 5 steps, which is orthogonal enough for an update direction.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of matrix = U S V^T: the same directions with every singular value near 1. A stack of
    matrices (n, rows, cols) is orthogonalized matrix by matrix, in batched products."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    # bf16 where the tensor cores run it (Ampere+), float32 elsewhere (CPU, T4: no fast bf16 there).
    fast_bf16 = matrix.is_cuda and torch.cuda.get_device_capability(matrix.device) >= (8, 0)
    x = matrix.to(torch.bfloat16 if fast_bf16 else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller square
        x = x.mT
    # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):  # X <- a X + (b G + c G G) X with G = X X^T
        gram = x @ x.mT
        if x.dim() == 2:  # one matrix, Muon's default: the terms as written, the rounding runs have always had
            x = a * x + (b * gram + c * gram @ gram) @ x
        else:  # a stack (muon_batched): baddbmm(input, m1, m2, beta, alpha) = beta input + alpha m1 m2 folds each
            # scaling and sum into its product, 3 kernels an iteration instead of 8
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: SGD with Nesterov momentum whose update is replaced by
    its nearest orthogonal matrix. For 2-D weights only. Every rank applies the same update to the same
    (all-reduced) gradient, so under DDP the replicas stay identical.

    batched: the matrices of one shape are updated together, their Newton-Schulz iterations as batched products
    (a d8 model has 48 matrices of 3 shapes): the same update in about 1/30 of the kernel launches. Otherwise one
    matrix at a time."""

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM_END, weight_decay: float = 0.0,
                 ns_steps: int = 5, batched: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.batched = batched
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only updates 2-D matrices, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self.batched:
                for shape in dict.fromkeys(p.shape for p in params):
                    self.update_together([p for p in params if p.shape == shape], group)
            else:
                for p in params:
                    self.update_together([p], group)

    def update_together(self, params: list[torch.Tensor], group: dict) -> None:
        """The update of params, all of one shape, one kernel per operation for all of them."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers, grads = [self.state[p]["momentum_buffer"] for p in params], [p.grad for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
        nesterov = torch._foreach_lerp(grads, buffers, group["momentum"])
        if len(params) == 1:  # a matrix on its own: no stacking copy, plain (not batched) products
            updates = [orthogonalize(nesterov[0], group["ns_steps"])]
        else:
            updates = orthogonalize(torch.stack(nesterov), group["ns_steps"]).unbind(0)
        # An orthogonal update of a tall matrix (more outputs than inputs) has a smaller RMS per entry; scale it
        # back up so every matrix moves by a similar amount.
        scale = max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"] * scale)


def build_optimizers(model: GPT, config: RunConfig) -> list[torch.optim.Optimizer]:
    """[AdamW for embedding, head (and the residual scalars), Muon for the block matrices]; every group records
    its "initial_lr"."""
    embedding = list(model.transformer.wte.parameters())
    head = list(model.lm_head.parameters())
    matrices = list(model.transformer.h.parameters())
    scalars = model.scalar_parameters()
    if len(embedding) + len(head) + len(matrices) + len(scalars) != len(list(model.parameters())):
        raise ValueError("build_optimizers: the model has parameters outside wte, lm_head, the blocks and the "
                         "residual scalars")
    width_scale = (model.config.n_embd / LR_REFERENCE_DIM) ** -0.5  # wider model -> smaller AdamW steps
    on_cuda = embedding[0].is_cuda
    groups = [dict(params=embedding, lr=config.embedding_lr * width_scale),
              dict(params=head, lr=config.unembedding_lr * width_scale)]
    if scalars:  # never decayed: weight decay would pull the residual's scale towards 0
        resid_lambdas, x0_lambdas = scalars
        groups += [dict(params=[resid_lambdas], lr=config.scalar_lr * RESID_LAMBDA_LR_FRACTION, weight_decay=0.0),
                   dict(params=[x0_lambdas], lr=config.scalar_lr, weight_decay=0.0)]
    adamw = torch.optim.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=config.weight_decay,
                              fused=on_cuda)
    # weight_decay on Muon's matrices too (nanochat's first release decays the AdamW groups only): one knob for all
    muon = Muon(matrices, lr=config.matrix_lr, weight_decay=config.weight_decay, batched=config.muon_batched)
    optimizers = [adamw, muon]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, config: RunConfig) -> float:
    """Linear warmup over warmup_ratio of the run, flat, then linear decay to final_lr_frac over the last
    warmdown_ratio of it."""
    warmup_steps = round(config.warmup_ratio * config.num_iterations)
    warmdown_steps = round(config.warmdown_ratio * config.num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= config.num_iterations - warmdown_steps:
        return 1.0
    remaining = (config.num_iterations - step) / warmdown_steps  # 1 at the start of warmdown, 0 at the end
    return remaining + (1 - remaining) * config.final_lr_frac


def muon_momentum(step: int, warmup: bool = True) -> float:
    """0.85 rising to 0.95 over the first 300 steps; 0.95 throughout without the warm-up (nanochat's RL)."""
    progress = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0) if warmup else 1.0
    return (1 - progress) * MUON_MOMENTUM_START + progress * MUON_MOMENTUM_END


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, config: RunConfig,
                    momentum_warmup: bool = True) -> None:
    """Set this step's learning rates (initial_lr x multiplier) and Muon momentum."""
    multiplier = lr_multiplier(step, config)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(optimizer, Muon):
                group["momentum"] = muon_momentum(step, momentum_warmup)
