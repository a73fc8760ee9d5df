import dataclasses
import math

import pytest
import torch

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.model import gpt
from nanochat_flyte.model.gpt import GPT, LOGIT_SOFTCAP, GPTConfig, KVCache, apply_rotary

TINY = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def build(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    return model


def randomize(model: GPT) -> None:
    """Fresh models predict uniformly (zero head and projections); give them context-dependent predictions."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)


def expected_params(c: GPTConfig) -> int:
    d, kv = c.n_embd, c.n_kv_head * c.head_dim
    attention = d * d + 2 * d * kv + d * d  # c_q, c_k, c_v, c_proj
    mlp = 2 * d * 4 * d
    return 2 * c.padded_vocab_size * d + c.n_layer * (attention + mlp)  # wte + lm_head + blocks


def test_from_depth_follows_nanochat_aspect_ratio():
    config = GPTConfig.from_depth(8, vocab_size=50257, sequence_len=512)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.head_dim) == (512, 4, 4, 128)
    assert GPTConfig.from_depth(3, 100, 16).head_dim == 96  # 192 wide, 2 heads
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="depth"):
        GPTConfig.from_depth(5, 100, 16)  # 320 does not split into 3 heads


def test_parameter_count_and_flops_formula():
    model = build()
    assert TINY.padded_vocab_size == 128
    assert model.num_params() == expected_params(TINY)
    attention_flops = 12 * TINY.n_layer * TINY.n_head * TINY.head_dim * TINY.sequence_len
    assert model.estimate_flops() == 6 * (expected_params(TINY) - 128 * 32) + attention_flops


def test_depth8_size_on_meta_device():
    config = GPTConfig.from_depth(8, vocab_size=50257, sequence_len=512)
    with torch.device("meta"):
        model = GPT(config)
    # 50257 is padded to 50304: 2 * 50304 * 512 embedding/head + 8 * 12 * 512^2 in the blocks
    assert model.num_params() == expected_params(config) == 76_677_120
    assert model.estimate_flops() == 6 * (76_677_120 - 50304 * 512) + 12 * 8 * 4 * 128 * 512 == 330_694_656


def test_shapes_loss_and_zero_init():
    model = build()
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, TINY.vocab_size)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    # zero head: uniform prediction, loss exactly ln(vocab_size)
    assert model(idx, idx).item() == pytest.approx(math.log(TINY.vocab_size), abs=1e-5)
    targets = idx.clone()
    targets[0, :4] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == targets.shape and (per_token[0, :4] == 0).all()


def mostly_ignored_targets(idx: torch.Tensor) -> torch.Tensor:
    """Targets of which most are -1, as in SFT (only the assistant's tokens count) and RL (only the sampled ones)."""
    targets = torch.roll(idx, -1, dims=1)
    targets[torch.rand(idx.shape, generator=torch.Generator().manual_seed(1)) < 0.7] = -1
    targets[1] = -1  # a row with no target at all
    return targets


@pytest.mark.parametrize("chunk_tokens", [0, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_loss_is_the_masked_cross_entropy_of_every_positions_logits(reduction, chunk_tokens, monkeypatch):
    """The head runs only at the positions whose target counts; the loss and the gradients are those of the
    logits at every position with the ignored targets masked out."""
    model = build()
    randomize(model)
    model.loss_chunk_tokens = chunk_tokens
    idx = torch.randint(0, TINY.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = mostly_ignored_targets(idx)
    weights = torch.linspace(-1, 2, targets.numel()).view_as(targets)  # RL weighs each token's loss

    def loss_and_grads(loss_of):
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        (loss * weights).sum().backward() if reduction == "none" else loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = loss_and_grads(lambda: torch.nn.functional.cross_entropy(
        model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction).view(
        targets.shape if reduction == "none" else ()))
    head_rows = []  # the rows of hidden states that reach the head, on the plain and on the chunked path
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: head_rows.append(len(inputs[0])))
    chunked = gpt.chunked_cross_entropy
    monkeypatch.setattr(gpt, "chunked_cross_entropy", lambda x, *args, **kwargs: head_rows.append(len(x))
                        or chunked(x, *args, **kwargs))
    loss, grads = loss_and_grads(lambda: model(idx, targets, loss_reduction=reduction))
    hook.remove()
    assert head_rows == [int((targets != -1).sum())]
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    if reduction == "none":
        assert (loss[targets == -1] == 0).all()


def test_a_compiled_model_scores_every_position_in_one_graph():
    """Under torch.compile the loss keeps one shape (no data-dependent selection: fullgraph would refuse it) and
    gives the eager loss."""
    model = build()
    randomize(model)
    idx = torch.randint(0, TINY.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = mostly_ignored_targets(idx)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(compiled(idx, targets, loss_reduction=reduction),
                                   model(idx, targets, loss_reduction=reduction))


def test_logits_are_softcapped():
    model = build()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 100.0)
    logits = model(torch.randint(0, TINY.vocab_size, (2, 8)))
    assert logits.abs().max() <= LOGIT_SOFTCAP
    assert logits.abs().max() > 0.9 * LOGIT_SOFTCAP  # huge weights really hit the cap


def test_causal_future_tokens_do_not_change_past_logits():
    model = build()
    randomize(model)
    idx = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


def test_logits_at_selects_positions_in_row_major_order():
    model = build()
    randomize(model)
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2], mask[0, 9], mask[2, 0] = True, True, True
    selected = model(idx, logits_at=mask)
    assert selected.shape == (3, TINY.vocab_size)
    torch.testing.assert_close(selected, model(idx)[mask])
    with pytest.raises(AssertionError, match="the loss needs them all"):
        model(idx, idx, logits_at=mask)


def test_fp16_and_bf16_autocast_keep_logits_and_loss_in_float32():
    model = build()
    randomize(model)  # a fresh model's head is zero: its logits are 0 in any dtype
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            logits = model(idx)
            loss = model(idx, idx)
        # softcapped in float32: not the autocast dtype's, nor its values merely cast up afterwards
        assert logits.dtype == torch.float32 and not torch.equal(logits, logits.to(dtype).float())
        assert loss.dtype == torch.float32
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, residual_scalars=True)],
                         ids=["original", "residual_scalars"])
def test_kv_cache_chunk_after_prefix_matches_full_forward(config):
    model = build(config)
    randomize(model)  # with residual scalars: every x0 and resid scalar non-trivial
    idx = torch.randint(0, TINY.vocab_size, (2, 10))  # batch of 2 through the cache
    cache = KVCache(config, batch_size=2, max_len=10)

    def cached(chunk: torch.Tensor) -> torch.Tensor:
        cache.start(chunk.size(1), chunk.device)
        logits = model(chunk, kv_cache=cache)
        cache.advance(chunk.size(1))
        return logits

    with torch.no_grad():
        first = cached(idx[:, :6])
        second = cached(idx[:, 6:])  # 4 queries over 10 keys: the masked path
        full = model(idx)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        cached(idx[:, :1])


def test_the_rotary_table_rotates_by_relative_position_and_stays_out_of_checkpoints():
    model = build()
    assert not any("rotary" in name for name in model.state_dict())  # recomputed from the config, never saved
    assert model.rotary_cos.shape == (TINY.sequence_len, TINY.head_dim // 2)
    # The point of rotary embeddings: a query and a key, rotated by the table at their positions, score the
    # same for any two positions the same distance apart.
    q, k = torch.randn(1, 1, 1, TINY.head_dim), torch.randn(1, 1, 1, TINY.head_dim)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        def at(x, position):
            cos, sin = model.rotary_cos[position], model.rotary_sin[position]
            return apply_rotary(x, cos[None, None, None], sin[None, None, None])
        return (at(q, query_position) * at(k, key_position)).sum()

    torch.testing.assert_close(score(5, 2), score(15, 12))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_more_positions_than_the_context_are_refused_by_name():
    model = build()
    with pytest.raises(ValueError, match="17 tokens exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache max_len: 17 positions exceed the model's context of 16"):
        KVCache(TINY, batch_size=1, max_len=17)


def test_residual_scalars_start_as_the_original_model_and_learn():
    original, scalars = build(seed=1), build(dataclasses.replace(TINY, residual_scalars=True), seed=1)
    assert scalars.num_params() == original.num_params() + 2 * TINY.n_layer
    assert scalars.estimate_flops() == original.estimate_flops()  # scalars are not matmul weights
    assert scalars.resid_lambdas.tolist() == [1.0, 1.0] and scalars.x0_lambdas.tolist() == [0.0, 0.0]
    randomize(original)
    with torch.no_grad():  # the same weights in both; scalars at their initial values
        for name, parameter in original.named_parameters():
            scalars.get_parameter(name).copy_(parameter)
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    torch.testing.assert_close(scalars(idx), original(idx))
    scalars(idx, idx).backward()
    assert scalars.x0_lambdas.grad.abs().min() > 0 and scalars.resid_lambdas.grad.abs().min() > 0
    with torch.no_grad():
        scalars.x0_lambdas.fill_(0.5)
    assert not torch.allclose(scalars(idx), original(idx))  # x0 now reaches every block


def test_a_model_config_from_before_residual_scalars_loads_as_the_original_model():
    saved = TINY.to_dict()
    del saved["residual_scalars"]
    assert GPTConfig.from_dict(saved) == TINY and not GPTConfig.from_dict(saved).residual_scalars
    assert GPTConfig.from_depth(2, 100, 16, residual_scalars=True).residual_scalars
