import pytest
import torch
from helpers import load_bench

from nanochat_flyte.config import RunConfig
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.model.optim import (
    NEWTON_SCHULZ_COEFFICIENTS,
    Muon,
    apply_schedules,
    build_optimizers,
    lr_multiplier,
    muon_momentum,
    orthogonalize,
)
from nanochat_flyte.training.loop import load_optimizer_states


def tiny_model(residual_scalars: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                          residual_scalars=residual_scalars))
    model.init_weights()
    return model


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64)])
def test_orthogonalize_gives_singular_values_near_one(shape):
    torch.manual_seed(0)
    singular_values = torch.linalg.svdvals(orthogonalize(torch.randn(shape)))
    # quintic Newton-Schulz lands every singular value in about [0.7, 1.2], not exactly on 1
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    assert torch.linalg.svdvals(torch.randn(shape)).max() > 5  # the input was far from orthogonal


def test_muon_step_is_an_orthogonal_update():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(24, 24))
    muon = Muon([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.randn(24, 24)
    muon.step()
    singular_values = torch.linalg.svdvals(weight.detach() / 0.1)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def test_param_groups_and_width_scaled_learning_rates():
    model = tiny_model()
    config = RunConfig(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    adamw, muon = build_optimizers(model, config)
    scale = (32 / 768) ** -0.5
    assert [g["initial_lr"] for g in adamw.param_groups] == pytest.approx([0.2 * scale, 0.004 * scale])
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert [g["initial_lr"] for g in muon.param_groups] == [0.02]
    optimized = {id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters()}


def test_residual_scalars_get_their_own_undecayed_adamw_groups():
    model = tiny_model(residual_scalars=True)
    config = RunConfig(scalar_lr=0.2, weight_decay=0.1)
    adamw, muon = build_optimizers(model, config)
    resid, x0 = adamw.param_groups[2:]
    assert resid["params"] == [model.resid_lambdas] and x0["params"] == [model.x0_lambdas]
    assert (resid["initial_lr"], x0["initial_lr"]) == pytest.approx((0.002, 0.2))  # resid: 1/100 of the x0 rate
    assert resid["weight_decay"] == x0["weight_decay"] == 0.0 and adamw.param_groups[0]["weight_decay"] == 0.1
    optimized = {id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    apply_schedules([adamw, muon], config.num_iterations - 1, config)  # the schedule scales them like the rest
    assert x0["lr"] == pytest.approx(0.2 * lr_multiplier(config.num_iterations - 1, config))


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_model()
    config = RunConfig(num_iterations=15, warmdown_ratio=0.0)
    optimizers = build_optimizers(model, config)
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (4, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses = []
    for step in range(config.num_iterations):
        apply_schedules(optimizers, step, config)
        loss = model(inputs, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # about 4.2 -> 0.25 in 15 steps


def test_lr_schedule_shape():
    config = RunConfig(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, config) == pytest.approx(0.1)  # warmup: 1/10 .. 10/10
    assert lr_multiplier(9, config) == 1.0
    assert lr_multiplier(50, config) == lr_multiplier(80, config) == 1.0  # flat until the last 20%
    assert lr_multiplier(90, config) == pytest.approx(0.5 + 0.5 * 0.1)  # halfway through warmdown
    assert lr_multiplier(100, config) == pytest.approx(0.1)  # ends at final_lr_frac
    decay = [lr_multiplier(s, config) for s in range(80, 101)]
    assert decay == sorted(decay, reverse=True)


def test_muon_momentum_warmup_and_apply_schedules():
    assert muon_momentum(0) == 0.85
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(5000) == pytest.approx(0.95)
    assert muon_momentum(0, warmup=False) == muon_momentum(150, warmup=False) == pytest.approx(0.95)  # RL's
    model = tiny_model()
    config = RunConfig(num_iterations=100, warmdown_ratio=0.5)
    adamw, muon = build_optimizers(model, config)
    apply_schedules([adamw, muon], 75, config)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.5 * muon.param_groups[0]["initial_lr"])
    assert adamw.param_groups[1]["lr"] == pytest.approx(0.5 * adamw.param_groups[1]["initial_lr"])
    assert muon.param_groups[0]["momentum"] == pytest.approx(muon_momentum(75))


def muon_run(batched: bool, steps: int = 3) -> tuple[list[torch.Tensor], Muon]:
    """Muon over a model's block matrices (square, tall and wide ones) for a few steps of seeded gradients."""
    model = tiny_model()
    with torch.no_grad():  # init_weights zeroes the projections: start from weights that weight decay can shrink
        for parameter in model.transformer.h.parameters():
            parameter.normal_(0.0, 0.1)
    matrices = list(model.transformer.h.parameters())
    muon = Muon(matrices, lr=0.02, weight_decay=0.1, batched=batched)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for matrix in matrices:
            matrix.grad = torch.randn(matrix.shape, generator=generator)
        muon.step()
    return [matrix.detach() for matrix in matrices], muon


def test_batched_muon_makes_the_updates_of_one_matrix_at_a_time():
    (one_at_a_time, single), (together, batched) = muon_run(batched=False), muon_run(batched=True)
    assert len({tuple(matrix.shape) for matrix in together}) == 3  # c_q/k/v and both projections' shapes
    for expected, actual in zip(one_at_a_time, together, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    def buffers(muon: Muon) -> list[torch.Tensor]:
        return [muon.state[matrix]["momentum_buffer"] for matrix in muon.param_groups[0]["params"]]

    for expected, actual in zip(buffers(single), buffers(batched), strict=True):
        torch.testing.assert_close(actual, expected)
    # the same state: a run saved with one way resumes with the other
    single.load_state_dict(batched.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(buffers(single), buffers(batched), strict=True))


@pytest.mark.parametrize("shape", [(48, 48), (64, 16), (16, 64), (3, 24, 40)])
def test_orthogonalize_is_the_quintic_iteration_written_out(shape):
    """The fused products (baddbmm) compute X <- a X + (b G + c G G) X, G = X X^T, on the wide orientation."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    x = matrix.mT if matrix.size(-2) > matrix.size(-1) else matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    expected = x.mT if matrix.size(-2) > matrix.size(-1) else x
    torch.testing.assert_close(orthogonalize(matrix), expected, rtol=1e-5, atol=1e-6)


def test_the_optimizer_bench_counts_fewer_dispatches_for_batched_muon(capsys):
    results = load_bench("optimizer_step").main(["--depth", "2", "--repeats", "1"])
    # depth 2: 12 matrices of 3 shapes; one at a time, each runs the whole update on its own
    assert results["muon_batched"]["aten_calls"] * 3 < results["muon"]["aten_calls"]
    assert all(results[name]["ms"] > 0 for name in ("muon", "muon_batched", "adamw"))
    assert "batched Muon dispatches" in capsys.readouterr().out


def test_orthogonalize_treats_a_stack_matrix_by_matrix():
    torch.manual_seed(0)
    for shape in ((3, 16, 16), (2, 24, 8)):  # square, and tall (iterated on its transpose)
        stack = torch.randn(shape)
        torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(m) for m in stack]),
                                   rtol=1e-5, atol=1e-6)


def test_the_config_chooses_batched_muon():
    assert not build_optimizers(tiny_model(), RunConfig())[1].batched  # one matrix at a time stays the default
    assert build_optimizers(tiny_model(), RunConfig(muon_batched=True))[1].batched


def test_a_state_saved_without_fused_adamw_loads_into_a_fused_one_with_its_steps_beside_the_parameters():
    # A base model pretrained on a CPU, fine-tuned on a GPU: the GPU's fused AdamW needs each `step` on the
    # parameters' device (torch: "Expected all tensors to be on the same device" otherwise). The meta device
    # stands in for the GPU; the run's settings win over the saved ones.
    saved = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=False)
    saved.param_groups[0]["params"][0].grad = torch.ones(3)
    saved.step()
    on_gpu = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3, device="meta"))], lr=0.5)
    on_gpu.param_groups[0]["fused"] = True  # as build_optimizers makes it on CUDA

    load_optimizer_states([on_gpu], [saved.state_dict()])

    state = next(iter(on_gpu.state.values()))
    assert state["step"].device.type == state["exp_avg"].device.type == "meta"
    assert on_gpu.param_groups[0]["lr"] == 0.5 and on_gpu.param_groups[0]["fused"] is True
