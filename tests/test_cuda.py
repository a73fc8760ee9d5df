"""The CUDA-only paths, on a real GPU: marked `cuda`, so they are skipped (not failed) where torch sees no CUDA
device, as in CI. bench/gpu_acceptance.py runs them on a lent GPU (docs/gpu_acceptance.md)."""

import dataclasses
import gc
import json
import math

import pytest
import torch
from helpers import make_data_dir, tiny_config
from test_chat_rl import base_checkpoint, metric_rows, rl_config, rl_data, sft_checkpoint, shortness  # noqa: F401
from torch._dynamo.utils import counters

from nanochat_flyte.data.dataloader import TokenLoader, shard_files
from nanochat_flyte.data.tokenizer import gpt2_tokenizer
from nanochat_flyte.evaluation.core import Row, score_rows
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.model.device import EvalBatches, replays_cuda_graphs, select_precision
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.model.optim import build_optimizers
from nanochat_flyte.training.loop import build_model, compile_model, make_grad_scaler, train_step
from nanochat_flyte.training.pretrain import train
from nanochat_flyte.training.rl import train_rl

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
VOCAB_SIZE = 50257


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=60_000, n_val_tokens=4_000)


def cuda_config(**overrides):
    return tiny_config(device="cuda", **{"depth": 2, "max_seq_len": 64, "device_batch_size": 8,
                                         "total_batch_size": 512, **overrides})


def fixed_batches(data_dir, config, count: int) -> list:
    """count micro-batches, read once: two models can then train on exactly the same data."""
    loader = TokenLoader(shard_files(data_dir, "train"), config.device_batch_size, config.max_seq_len,
                         seed=config.seed, device=CUDA)
    batches = [next(loader) for _ in range(count)]
    loader.close()
    return batches


def train_losses(model, config, batches, precision, grad_scaler=None) -> list[float]:
    optimizers = build_optimizers(model, config)
    stream = iter(batches)
    return [train_step(model, optimizers, stream, 1, precision, grad_scaler, config.grad_clip).loss
            for _ in range(len(batches))]


def test_an_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(data_dir):
    config = cuda_config(dtype="float16")
    precision = select_precision(CUDA, "float16")
    assert precision.use_grad_scaler
    model = build_model(config, VOCAB_SIZE, CUDA)
    optimizers = build_optimizers(model, config)
    # 2^40 times the loss's gradient (~1/512 per logit) is ~2e9: far past fp16's largest value, 65504, so the
    # backward pass overflows in the fp16 matmuls themselves, as a real loss spike would
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    loader = TokenLoader(shard_files(data_dir, "train"), config.device_batch_size, config.max_seq_len, seed=0,
                         device=CUDA)
    before = [parameter.detach().clone() for parameter in model.parameters()]

    first = train_step(model, optimizers, loader, 1, precision, scaler, config.grad_clip)
    assert first.skipped and not math.isfinite(first.grad_norm)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**39  # backed off by half

    results = [train_step(model, optimizers, loader, 1, precision, scaler, config.grad_clip) for _ in range(50)]
    loader.close()
    skipped = sum(result.skipped for result in results)
    assert scaler.get_scale() == 2.0 ** (39 - skipped)  # halved once per overflow, not raised within 2000 steps
    assert sum(result.skipped for result in results[-20:]) <= 2, "the scale never settled below the overflow"
    trained = [result for result in results if not result.skipped]
    assert all(math.isfinite(result.loss) and math.isfinite(result.grad_norm) for result in trained)
    assert sum(result.loss for result in trained[-3:]) / 3 < trained[0].loss - 0.5  # and it trains on


def test_bf16_autocast_trains_like_float32(data_dir):
    config = cuda_config(dtype="bfloat16")
    precision = select_precision(CUDA, "auto")
    assert precision.dtype == torch.bfloat16 and make_grad_scaler(precision, CUDA) is None  # Ampere and newer
    batches = fixed_batches(data_dir, config, 6)
    model = build_model(config, VOCAB_SIZE, CUDA)
    with precision.autocast():
        assert model.lm_head(torch.randn(2, model.config.n_embd, device=CUDA)).dtype == torch.bfloat16
    bf16 = train_losses(model, config, batches, precision)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    fp32 = train_losses(build_model(config, VOCAB_SIZE, CUDA), config, batches, select_precision(CUDA, "float32"))
    assert bf16[0] == pytest.approx(math.log(VOCAB_SIZE), rel=1e-3)  # the zero-initialised head: uniform
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert bf16[-1] < bf16[0] - 0.5


def test_the_compiled_train_step_gives_the_eager_losses(data_dir):
    config = cuda_config(dtype="bfloat16", compile=True)
    precision = select_precision(CUDA, config.dtype)
    batches = fixed_batches(data_dir, config, 4)
    eager = train_losses(build_model(config, VOCAB_SIZE, CUDA), config, batches, precision)
    compiled_model = compile_model(build_model(config, VOCAB_SIZE, CUDA), config, CUDA)
    assert isinstance(compiled_model, torch._dynamo.eval_frame.OptimizedModule)
    compiled = train_losses(compiled_model, config, batches, precision)
    # the same function: Inductor only fuses and reorders, which moves bf16 roundings around
    assert compiled == pytest.approx(eager, rel=1e-2)
    assert compiled[-1] < compiled[0]


def test_cuda_graphs_with_gradient_accumulation_train_as_the_default_compile_does(data_dir):
    """compile_mode reduce-overhead on the T4 path (fp16 + GradScaler), 4 micro-batches a step: a replay must not
    overwrite the gradients or losses of the micro-batches before it (pytorch/pytorch#169545)."""
    config = cuda_config(dtype="float16", compile=True, device_batch_size=2)
    graphs = dataclasses.replace(config, compile_mode="reduce-overhead")
    assert config.grad_accum_steps() == 4 and replays_cuda_graphs(graphs.compile, graphs.compile_mode, CUDA)
    assert not replays_cuda_graphs(config.compile, config.compile_mode, CUDA)
    precision = select_precision(CUDA, "float16")
    batches = fixed_batches(data_dir, config, 4 * 5)

    def losses_and_scale(run_config) -> tuple[list[float], float]:
        model = compile_model(build_model(run_config, VOCAB_SIZE, CUDA), run_config, CUDA)
        optimizers, scaler = build_optimizers(model, run_config), make_grad_scaler(precision, CUDA)
        stream = iter(batches)
        replays = replays_cuda_graphs(run_config.compile, run_config.compile_mode, CUDA)
        losses = [train_step(model, optimizers, stream, 4, precision, scaler, run_config.grad_clip,
                             cuda_graphs=replays).loss for _ in range(5)]
        torch.compiler.reset()
        return losses, scaler.get_scale()

    default = losses_and_scale(config)
    counters.clear()
    replayed = losses_and_scale(graphs)
    # replayed as graphs, not silently run as the default compile (which would pass the comparison trivially)
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert replayed[0] == pytest.approx(default[0], rel=1e-2) and replayed[1] == default[1]
    assert replayed[0][-1] < replayed[0][0] - 0.5


def test_a_run_with_cuda_graphs_evaluates_and_finishes(data_dir, tmp_path):
    """The whole loop under compile_mode reduce-overhead: training steps, validation (inference replays of the
    same compiled model) between them, samples and checkpoints."""
    config = cuda_config(dtype="float16", compile=True, compile_mode="reduce-overhead", num_iterations=12,
                         eval_every=4, eval_tokens=2 * 8 * 65, sample_every=12, save_every=12)
    summary = train(config, data_dir, tmp_path / "run")
    torch.compiler.reset()
    assert summary["status"] == "completed" and summary["steps_completed"] == 12
    bpb = metric_rows(tmp_path / "run", "val/bpb")
    assert len(bpb) == 4 and all(math.isfinite(value) for value in bpb) and bpb[-1] < bpb[0]


def test_the_chunked_loss_trains_like_the_plain_one_in_fp16_eager_and_compiled(data_dir):
    """loss_chunk_tokens on the T4 path (fp16 through the GradScaler): the chunked model eager and compiled against
    the plain path in eager mode; 512 tokens a micro-batch in chunks of 200 (the last one short)."""
    config = cuda_config(dtype="float16", compile=True, loss_chunk_tokens=200)
    precision = select_precision(CUDA, "float16")
    batches = fixed_batches(data_dir, config, 4)

    def losses_and_scale(model) -> tuple[list[float], float | None]:
        scaler = make_grad_scaler(precision, CUDA)
        return train_losses(model, config, batches, precision, scaler), scaler and scaler.get_scale()

    plain = losses_and_scale(build_model(dataclasses.replace(config, loss_chunk_tokens=0), VOCAB_SIZE, CUDA))
    eager = losses_and_scale(build_model(config, VOCAB_SIZE, CUDA))
    compiled = losses_and_scale(compile_model(build_model(config, VOCAB_SIZE, CUDA), config, CUDA))
    for losses, scale in (eager, compiled):
        assert losses == pytest.approx(plain[0], rel=1e-2)  # as compiled vs eager: 16-bit roundings move around
        assert scale == plain[1] and losses[-1] < losses[0]


def test_the_chunked_loss_gives_the_plain_gradients_and_needs_less_memory():
    """One forward and backward at context 512 (8 x 512 tokens, GPT-2's vocabulary), in fp16 and in bf16: the
    gradients of every weight match, and the peak allocated memory is lower in chunks of 1,024 tokens than with all
    logits at once."""
    inputs = torch.randint(0, VOCAB_SIZE, (8, 512), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    targets = inputs.roll(-1, dims=1)
    targets[:, :100] = -1  # masked, as SFT masks what is not the assistant's
    for dtype in (torch.float16, torch.bfloat16):
        results = []
        for chunk_tokens in (0, 1024):
            torch.manual_seed(0)
            model = GPT(GPTConfig.from_depth(1, VOCAB_SIZE, 512), loss_chunk_tokens=chunk_tokens).to(CUDA)
            model.init_weights()
            with torch.no_grad():  # the zero-initialised head and projections would make every gradient alike
                for parameter in model.parameters():
                    parameter.add_(0.02 * torch.randn_like(parameter))
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=dtype):
                loss = model(inputs, targets)
            (2.0**16 * loss).backward()  # the GradScaler's first scale: fp16 gradients stay normal numbers
            torch.cuda.synchronize()
            # the gradients leave the GPU, so that the next model's peak counts its own tensors only
            results.append((loss.item(), {name: p.grad.cpu() for name, p in model.named_parameters()},
                            torch.cuda.max_memory_allocated()))
        (plain_loss, plain_grads, plain_peak), (chunked_loss, chunked_grads, chunked_peak) = results
        assert chunked_loss == pytest.approx(plain_loss, rel=1e-3)
        for name, expected in plain_grads.items():
            assert (chunked_grads[name] - expected).abs().max() <= 2e-2 * expected.abs().max(), (dtype, name)
        assert chunked_peak < plain_peak, (dtype, chunked_peak, plain_peak)


def test_pinned_prefetched_batches_equal_unprefetched_ones(data_dir):
    files = shard_files(data_dir, "train")

    def loader(prefetch: bool) -> TokenLoader:
        return TokenLoader(files, 16, 64, seed=3, device=CUDA, prefetch=prefetch)

    direct, prefetched = loader(False), loader(True)
    assert direct._read_batch(0).is_pinned()  # pinned whole, so that its copy to the GPU is a pinned one
    for _ in range(70):  # 60,000 tokens are ~930 windows: 70 batches of 16 cross into the second epoch
        (x1, y1), (x2, y2) = next(direct), next(prefetched)
        assert x2.is_cuda and x2.is_contiguous() and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert prefetched.epoch > 1
    resumed = loader(True)
    resumed.load_state_dict(prefetched.state_dict())
    prefetched.close()
    for _ in range(5):
        (x1, y1), (x2, y2) = next(direct), next(resumed)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    direct.close()
    resumed.close()


class Killed(Exception):
    pass


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_and_resumed_fp16_run_continues_the_same_loss_curve(data_dir, tmp_path):
    config = tiny_config(device="cuda", dtype="float16")  # fp16: the GradScaler's state must resume too

    def kill_after_first_save(path):
        raise Killed

    train(config, data_dir, tmp_path / "straight")
    with pytest.raises(Killed):
        train(config, data_dir, tmp_path / "first", on_save=kill_after_first_save)
    summary = train(config, data_dir, tmp_path / "resumed", resume_dir=tmp_path / "first")

    def curve(out_dir):
        rows = [row for row in read_metrics(out_dir) if "train/loss" in row]
        return [row["step"] for row in rows], [row["train/loss"] for row in rows], [row["train/grad_scale"]
                                                                                   for row in rows]

    straight_steps, straight_losses, straight_scales = curve(tmp_path / "straight")
    steps, losses, scales = curve(tmp_path / "resumed")
    assert steps == straight_steps == [1, 2, 3, 4, 5, 6]  # no step lost, none logged twice
    assert losses == pytest.approx(straight_losses, rel=1e-3)  # CUDA reductions may differ in the last bits
    assert scales == straight_scales
    assert summary["status"] == "completed" and summary["device"] == "cuda"


def peak_reserved_bytes(config, data_dir, batch_size: int) -> int:
    """The allocator's peak reservation (what the memory fraction caps) over one fp32 step at batch_size."""
    config = dataclasses.replace(config, device_batch_size=batch_size,
                                 total_batch_size=batch_size * config.max_seq_len)
    model = build_model(config, VOCAB_SIZE, CUDA)
    optimizers = build_optimizers(model, config)
    loader = TokenLoader(shard_files(data_dir, "train"), batch_size, config.max_seq_len, seed=0, device=CUDA)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizers, loader, 1, select_precision(CUDA, "float32"), None, config.grad_clip)
    torch.cuda.synchronize()
    loader.close()
    return torch.cuda.max_memory_reserved()


def test_a_real_out_of_memory_error_halves_the_device_batch_and_keeps_the_total_batch(data_dir, tmp_path,
                                                                                       capsys):
    # depth 1 at context 512: the fp32 logits (512 x 50,304 x 4 bytes, ~100 MB a row, several copies in the
    # backward pass) dwarf the model, so memory grows with the batch in steps of ~0.5 GB a row
    config = tiny_config(device="cuda", dtype="float32", max_seq_len=512, device_batch_size=8,
                         total_batch_size=8 * 512, num_iterations=2, eval_every=2, sample_every=2, save_every=2,
                         eval_tokens=513)  # one validation row: evaluation needs less memory than a step
    peak_at_2 = peak_reserved_bytes(config, data_dir, 2)
    peak_at_4 = peak_reserved_bytes(config, data_dir, 4)
    cap = peak_at_4 + (peak_at_4 - peak_at_2)  # halfway between what batch 4 needs and what batch 8 would
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(CUDA).total_memory)
    try:
        summary = train(config, data_dir, tmp_path)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "CUDA out of memory: retrying with device_batch_size 4, 2 accumulation steps" in capsys.readouterr().out
    assert summary["status"] == "completed" and summary["steps_completed"] == 2
    assert summary["device_batch_size"] == 4 and summary["grad_accum_steps"] == 2
    assert summary["tokens_seen"] == 2 * 8 * 512  # the optimizer still saw the whole batch each step
    losses = [row["train/loss"] for row in read_metrics(tmp_path) if "train/loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def scored_with_peak(model: GPT, rows: list[Row], batches: EvalBatches) -> tuple[tuple, int]:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    scores = score_rows(model, rows, batches=batches, pad_token=0, device=CUDA,
                        precision=select_precision(CUDA, "float32"))
    torch.cuda.synchronize()
    return scores, torch.cuda.max_memory_reserved()


def test_a_real_out_of_memory_error_in_evaluation_halves_the_batch_and_scores_the_same(capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, VOCAB_SIZE, 512)).to(CUDA)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised head and projections would make every loss equal
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    # 64 rows with 256-token answer spans: the span logits alone are 64 x 256 x 50,257 floats (3.3 GB), so memory
    # grows with the batch in steps of ~50 MB a row
    rows = [Row(torch.randint(VOCAB_SIZE, (512,)).tolist(), start=256) for _ in range(64)]
    expected, peak_at_4 = scored_with_peak(model, rows, EvalBatches(4))
    _, peak_at_64 = scored_with_peak(model, rows, EvalBatches(64))
    cap = peak_at_4 + (peak_at_64 - peak_at_4) // 4  # room for about 16 rows, not for 32 or 64
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(CUDA).total_memory)
    try:
        batches = EvalBatches(64, "CORE")
        losses, exact = scored_with_peak(model, rows, batches)[0]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "CORE: CUDA out of memory; continuing at batch size 32" in capsys.readouterr().out
    assert 4 <= batches.size < 64
    assert losses == pytest.approx(expected[0], rel=1e-3) and exact == expected[1]


def greedy_without_cache(model: GPT, prompt: list[int], max_tokens: int, stop_ids: frozenset[int]) -> list[int]:
    """The reference: greedy decoding that recomputes the whole sequence for every token."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = model(torch.tensor([tokens], device=CUDA))[0, -1].argmax().item()
            if token in stop_ids:
                break
            tokens.append(token)
    return tokens[len(prompt):]


def test_generation_with_the_kv_cache_gives_the_tokens_of_full_recomputation():
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tokenizer.n_vocab, 128)).to(CUDA)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised head and projections would make every logit equal
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    engine = Engine(model, tokenizer, select_precision(CUDA, "float32"))
    # prompts of different lengths in one batch: each row has its own cache length and rotary positions
    prompts = [engine.completion_prompt(text) for text in ("The capital of France is", "My favorite color is",
                                                           "If yesterday was Friday, then tomorrow will be")]
    completions = engine.generate_batch(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, completion in zip(prompts, completions, strict=True):
        assert completion.tokens == greedy_without_cache(model, prompt, 24, engine.stop_ids)
    assert any(len(set(completion.tokens)) > 1 for completion in completions)  # real sequences, not one token


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_compiled_decode_step_gives_the_eager_tokens(mode):
    """Engine(compile=True): a batch that shrinks as rows finish, then the same prompt alone twice (reduce-overhead:
    CUDA graphs, replayed from one request to the next: the caches stay in the engine's storage). In float32, where
    fusing kernels moves no rounding far enough to flip a greedy choice."""
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tokenizer.n_vocab, 128)).to(CUDA)
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    precision = select_precision(CUDA, "float32")
    eager = Engine(model, tokenizer, precision)
    compiled = Engine(model, tokenizer, precision, compile=True, compile_mode=mode)
    assert compiled.cuda_graphs == (mode == "reduce-overhead")
    prompts = [eager.completion_prompt(text) for text in ("The capital of France is", "My favorite color is")]
    params = [SamplingParams(max_tokens=24), SamplingParams(max_tokens=12)]
    expected = eager.generate_batch(prompts, params)
    counters.clear()  # (process-wide, and torch.compiler.reset() leaves them: earlier tests recorded graphs too)
    assert [c.tokens for c in compiled.generate_batch(prompts, params)] == [c.tokens for c in expected]
    recordings = []  # each CUDA graph recorded counts its inputs that are copied in at a replay (ids, positions, mask)
    for _ in range(2):
        assert compiled.generate_batch(prompts[:1], params[0])[0].tokens == expected[0].tokens
        recordings.append(counters["inductor"]["cudagraph_recorded_non_static_inputs"])
    if compiled.cuda_graphs:  # the second request replays the graphs (its cache lies where the first one's did)
        assert recordings[0] > 0 and recordings[1] == recordings[0]
        assert counters["inductor"]["cudagraph_skips"] == 0  # no step fell back to running without graphs
    torch.compiler.reset()


def test_rl_in_fp16_with_a_compiled_model_learns_its_reward(sft_checkpoint, rl_data, tmp_path):  # noqa: F811
    """RL as a T4 runs it: fp16 autocast with the GradScaler, the compiled model on rows of one shape, the rollouts
    decoded on the GPU. With the reward for short answers (tests/test_chat_rl.py) the answers get shorter."""
    config = rl_config(device="cuda", dtype="float16", compile=True, num_iterations=16, eval_every=16,
                       sample_every=16, save_every=16, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.01,
                       init_lr_frac=1.0)
    summary = train_rl(config, sft_checkpoint, rl_data, tmp_path / "rl", reward=shortness)
    assert summary["device"] == "cuda" and summary["steps_completed"] == 16
    assert all(math.isfinite(loss) for loss in metric_rows(tmp_path / "rl", "train/loss"))
    lengths = metric_rows(tmp_path / "rl", "rl/answer_tokens")
    assert sum(lengths[-4:]) / 4 < sum(lengths[:4]) / 4 - 2, (lengths, summary["skipped_steps"])
