"""Validation bits per byte (bpb), nanochat's headline metric.

Cross-entropy per token depends on the tokenizer; per byte of UTF-8 text it does not, so runs with
different vocabularies compare. bpb = (sum of target-token losses in nats) / (ln 2 * sum of their byte
lengths). Special tokens (<|endoftext|>, byte length 0) count in neither sum.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.model.device import Precision, rank_and_world_size


def evaluate_bpb(model: nn.Module, val_tokens: np.ndarray, token_bytes: np.ndarray | torch.Tensor, *,
                 batch_size: int, seq_len: int, eval_tokens: int, device: torch.device,
                 precision: Precision) -> float:
    """bpb on the first eval_tokens validation tokens, cut into non-overlapping windows of seq_len + 1
    (inputs w[:-1], targets w[1:]): the same fixed slice at every evaluation of every run.

    Under torch.distributed every rank must call this: the ranks share the windows and add up their sums.
    """
    if len(val_tokens) < eval_tokens:
        raise ConfigError("eval_tokens", f"{eval_tokens} tokens asked for, but the validation split holds only "
                                         f"{len(val_tokens)}")
    window = seq_len + 1
    num_windows = eval_tokens // window
    rank, world_size = rank_and_world_size()
    token_bytes = torch.as_tensor(token_bytes, device=device)
    # float32 sums are exact to ~1e-7 relative at a few million target tokens: far below run-to-run noise
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # batch k holds windows k*batch_size ...; rank r takes batches r, r + world_size, ...
            for first in range(rank * batch_size, num_windows, world_size * batch_size):
                count = min(batch_size, num_windows - first)
                chunk = val_tokens[first * window:(first + count) * window].astype(np.int64)
                batch = torch.from_numpy(chunk).view(count, window).to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with precision.autocast():
                    losses = model(inputs, targets, loss_reduction="none")
                target_bytes = token_bytes[targets]
                total_nats += torch.where(target_bytes > 0, losses, 0.0).sum()
                total_bytes += target_bytes.sum()
    finally:
        model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb: the evaluated slice has no target tokens with a byte length")
    return total_nats.item() / (math.log(2) * total_bytes.item())
