"""The chunked loss (RunConfig.loss_chunk_tokens) against the plain path: the same losses and gradients in float32
and under CPU autocast, with ignored targets, in every reduction the stages use (pretraining's and SFT's mean, the
evaluations' per-token losses, RL's advantage-weighted sum), and through the training step with fp16's GradScaler."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import load_bench, tiny_config

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.bpb import evaluate_bpb
from nanochat_flyte.model.chunked_loss import chunked_cross_entropy
from nanochat_flyte.model.device import select_precision
from nanochat_flyte.model.gpt import GPT, LOGIT_SOFTCAP, GPTConfig
from nanochat_flyte.model.optim import build_optimizers
from nanochat_flyte.training.loop import build_model, make_grad_scaler, train_step
from nanochat_flyte.training.rl import policy_gradient_loss

CONFIG = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)  # padded to 128
CPU = torch.device("cpu")
# float32: the same arithmetic in another order. bf16/fp16: each chunk's head gradient is rounded to 16 bits
# before the chunks are summed, where the plain path rounds the whole sum once (bf16 keeps 8 bits: ~0.4%).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def model_pair(chunk_tokens: int) -> tuple[GPT, GPT]:
    """The same randomly initialised weights, one model on the plain path and one on the chunked."""
    models = []
    for chunks in (0, chunk_tokens):
        torch.manual_seed(0)
        model = GPT(CONFIG, loss_chunk_tokens=chunks)
        model.init_weights()
        with torch.no_grad():  # the zero-initialised head and projections would make every loss ln(vocab)
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.3)
        models.append(model)
    return models[0], models[1]


def batch(rows: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, some of them -1: SFT masks what is not the assistant's, RL what it did not sample."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, CONFIG.vocab_size, (rows, CONFIG.sequence_len), generator=generator)
    targets = torch.randint(0, CONFIG.vocab_size, (rows, CONFIG.sequence_len), generator=generator)
    targets[0, :5] = -1
    targets[1, -3:] = -1
    return inputs, targets


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within the dtype's tolerance, relative to the largest entry (gradients have many near-zero ones)."""
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= TOLERANCE[dtype] * scale


def gradients(model: GPT) -> dict[str, torch.Tensor]:
    return {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [7, 1000], ids=["uneven-chunks", "one-chunk"])
def test_losses_and_gradients_match_the_plain_path(dtype, reduction, chunk_tokens):
    inputs, targets = batch()
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))  # a gradient per token
    results = []
    for model in model_pair(chunk_tokens):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(inputs, targets, loss_reduction=reduction)
        (loss * weights if reduction == "none" else loss).sum().backward()
        results.append((loss.detach(), gradients(model)))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss.dtype == torch.float32 and chunked_loss.shape == plain_loss.shape
    assert_close(chunked_loss, plain_loss, dtype)
    if reduction == "none":
        assert (chunked_loss[targets == -1] == 0).all()
    for name, expected in plain_grads.items():  # the head, and through the hidden states every other weight
        assert_close(chunked_grads[name], expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_the_hidden_states_and_head_get_the_gradients_of_the_plain_formula(dtype):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 20, 16, generator=generator)
    head = torch.randn(64, 16, generator=generator)  # 60 tokens padded to 64 rows, as the model pads
    targets = torch.randint(0, 60, (2, 20), generator=generator)
    targets[:, ::4] = -1
    results = []
    for chunked in (False, True):
        x, weight = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if chunked:
                loss = chunked_cross_entropy(x, weight, targets, vocab_size=60, softcap=LOGIT_SOFTCAP, chunk_tokens=9)
            else:
                logits = LOGIT_SOFTCAP * torch.tanh(F.linear(x, weight)[..., :60].float() / LOGIT_SOFTCAP)
                loss = F.cross_entropy(logits.reshape(-1, 60), targets.reshape(-1), ignore_index=-1)
        loss.backward()
        results.append((loss.detach(), x.grad, weight.grad))
    for actual, expected in zip(results[1], results[0], strict=True):
        assert_close(actual, expected, dtype)
    assert not results[1][2][60:].any()  # the padding rows of the head get no gradient
    assert x.grad.dtype == weight.grad.dtype == torch.float32


def test_a_mean_over_many_tokens_keeps_its_fp16_gradients():
    """The training loss (a mean, gradients wanted) has its gradients computed in the forward pass; its 16-bit
    products see every token's gradient at weight 1, the 1/N of the mean applied in float32 afterwards. With N = 4,096
    and 10,000 logits a token most per-logit gradients of the mean (~1e-4 / 4,096) are below fp16's smallest number
    (6e-8): scaled inside the products, they would be flushed to zero."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(4096, 32, generator=generator)
    head = 0.1 * torch.randn(10048, 32, generator=generator)
    targets = torch.randint(0, 10000, (4096,), generator=generator)
    results = []
    for dtype in (torch.float32, torch.float16):
        x, weight = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = chunked_cross_entropy(x, weight, targets, vocab_size=10000, softcap=LOGIT_SOFTCAP, chunk_tokens=1024)
        assert type(loss.grad_fn).__name__ == "FusedSoftcapCrossEntropyBackward"
        loss.backward()
        results.append((loss.item(), x.grad, weight.grad))
    (loss32, x32, w32), (loss16, x16, w16) = results
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    assert_close(x16, x32, torch.float16)
    assert_close(w16, w32, torch.float16)
    assert (w16[:10000] != 0).float().mean() > 0.99  # not flushed to zero
    with torch.no_grad():  # evaluation: per-token losses, nothing computed for a backward pass
        plain_losses = chunked_cross_entropy(hidden, head, targets, vocab_size=10000, softcap=LOGIT_SOFTCAP,
                                             chunk_tokens=1024, reduction="none")
    assert plain_losses.mean().item() == pytest.approx(loss32, rel=1e-6)


def test_rl_policy_gradient_loss_and_its_gradients_match():
    inputs, targets = batch(rows=4)
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0])  # RL's per-answer weights on per-token losses
    results = []
    for model in model_pair(5):
        loss = policy_gradient_loss(model, (inputs, targets, advantages))
        loss.backward()
        results.append((loss.detach(), gradients(model)))
    assert_close(results[1][0], results[0][0], torch.float32)
    for name, expected in results[0][1].items():
        assert_close(results[1][1][name], expected, torch.float32)


def test_a_micro_batch_without_a_target_is_nan_in_the_mean_as_in_the_plain_path():
    inputs, targets = batch()
    targets[:] = -1
    plain, chunked = (model(inputs, targets) for model in model_pair(8))
    assert math.isnan(plain.item()) and math.isnan(chunked.item())


def test_validation_bpb_is_the_same():
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 4 * (CONFIG.sequence_len + 1))
    token_bytes = np.random.default_rng(1).integers(0, 4, CONFIG.vocab_size)  # some tokens of 0 bytes
    plain, chunked = (evaluate_bpb(model, tokens, token_bytes, batch_size=2, seq_len=CONFIG.sequence_len,
                                   eval_tokens=len(tokens), device=CPU, precision=select_precision(CPU))
                      for model in model_pair(10))
    assert chunked == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_training_steps_match_also_in_fp16_with_the_grad_scaler(dtype):
    """The real train_step: the chunked loss's gradients go through the GradScaler's scaling, unscaling and inf
    check, clipping and both optimizers as the plain path's do."""
    config = tiny_config(dtype=dtype, grad_clip=1.0)
    precision = select_precision(CPU, dtype)
    assert precision.use_grad_scaler == (dtype == "float16")
    tokens = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    runs = []
    for chunk_tokens in (0, 24):  # 4 rows of 32 tokens: chunks that cut rows
        model = build_model(dataclasses.replace(config, loss_chunk_tokens=chunk_tokens), 300, CPU)
        assert model.loss_chunk_tokens == chunk_tokens
        optimizers, scaler = build_optimizers(model, config), make_grad_scaler(precision, CPU)
        batches = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))  # one batch, learned by heart
        results = [train_step(model, optimizers, batches, 2, precision, scaler, config.grad_clip) for _ in range(4)]
        runs.append(([r.loss for r in results], [r.grad_norm for r in results], scaler and scaler.get_scale()))
    (plain_losses, plain_norms, plain_scale), (chunked_losses, chunked_norms, chunked_scale) = runs
    tolerance = TOLERANCE[getattr(torch, dtype)] * 5  # four steps of compounding roundings
    assert chunked_losses == pytest.approx(plain_losses, rel=tolerance)
    assert chunked_norms == pytest.approx(plain_norms, rel=tolerance)
    assert chunked_scale == plain_scale and chunked_losses[-1] < chunked_losses[0]


def test_loss_chunk_tokens_is_validated():
    with pytest.raises(ConfigError, match="RunConfig.loss_chunk_tokens: must be >= 0"):
        tiny_config(loss_chunk_tokens=-1).validate()
    assert tiny_config().loss_chunk_tokens == 0  # the plain path stays the default


def test_the_memory_bench_finds_the_chunked_loss_smaller_at_the_same_loss():
    plain, chunked = load_bench("loss_memory").main(["--tokens", "512", "--chunks", "0,128", "--dtypes", "float32"])
    assert (plain["chunk_tokens"], chunked["chunk_tokens"]) == (0, 128)
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    # the plain path holds several copies of 512 x 50,304 float logits (98 MiB each), the chunked one of 128 rows;
    # both hold the two weights' gradients (98 MiB each)
    assert chunked["peak_mib"] < 0.75 * plain["peak_mib"]
