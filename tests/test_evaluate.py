import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.bpb import evaluate_bpb
from nanochat_flyte.model.device import Precision
from nanochat_flyte.model.gpt import GPT, GPTConfig

FP32 = Precision(torch.float32, use_grad_scaler=False, device_type="cpu")
# Token 3 is special (0 bytes); tokens 0, 1, 2 are 1, 2 and 4 bytes long.
TOKEN_BYTES = np.array([1, 2, 4, 0])
# Two windows of seq_len 3 + 1, then tokens past eval_tokens = 8 that must not be scored.
VAL_TOKENS = np.array([0, 1, 2, 3,
                       3, 0, 0, 2,
                       1, 1, 1, 1], dtype=np.uint16)


class FixedDistribution(nn.Module):
    """Predicts p = (1/2, 1/4, 1/8, 1/8) at every position: token t costs exactly 1, 2, 3, 3 bits."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.5, 0.25, 0.125, 0.125]).log())
        self.modes_seen = []

    def forward(self, idx, targets, loss_reduction="mean"):
        self.modes_seen.append(self.training)
        logits = self.logits.expand(*targets.shape, 4)
        return F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), reduction=loss_reduction).view_as(targets)


def bpb(model, batch_size=1, eval_tokens=8):
    return evaluate_bpb(model, VAL_TOKENS, TOKEN_BYTES, batch_size=batch_size, seq_len=3, eval_tokens=eval_tokens,
                        device=torch.device("cpu"), precision=FP32)


def test_hand_computed_bits_per_byte():
    # window 1 targets 1, 2, 3 -> bits 2 + 3 (+ special 3, not counted), bytes 2 + 4
    # window 2 targets 0, 0, 2 -> bits 1 + 1 + 3, bytes 1 + 1 + 4
    model = FixedDistribution()
    assert bpb(model) == pytest.approx(10 / 12)
    assert bpb(model, batch_size=2) == pytest.approx(10 / 12)
    assert model.modes_seen and not any(model.modes_seen)  # evaluated in eval mode ...
    assert model.training  # ... and handed back in train mode
    # eval_tokens 11 still holds only two whole windows: the same fixed slice, the same number
    assert bpb(model, eval_tokens=11) == pytest.approx(10 / 12)
    with pytest.raises(ConfigError, match="eval_tokens"):
        bpb(model, eval_tokens=13)


def test_untrained_gpt_scores_ln_vocab_per_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=50, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    model.init_weights()  # zero head: uniform prediction, every target costs ln 50 nats
    val = np.random.default_rng(0).integers(0, 50, 60).astype(np.uint16)
    token_bytes = np.arange(50) % 4  # every fourth token is "special"
    result = evaluate_bpb(model, val, token_bytes, batch_size=2, seq_len=8, eval_tokens=54,
                          device=torch.device("cpu"), precision=FP32)
    targets = val[:54].reshape(6, 9)[:, 1:]
    counted = token_bytes[targets]
    assert result == pytest.approx((counted > 0).sum() * math.log(50) / (math.log(2) * counted.sum()), rel=1e-6)


def evaluate_on_rank(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = FixedDistribution()
        assert bpb(model) == pytest.approx(10 / 12)  # the all-reduced sums give the single-process bpb
        assert len(model.modes_seen) == 1  # this rank scored one of the two windows
    finally:
        dist.destroy_process_group()


def test_ranks_share_windows_and_sum(tmp_path):
    mp.spawn(evaluate_on_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2)  # raises if a rank fails
