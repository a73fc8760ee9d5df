"""Device and precision choice. No GPU here: CUDA's answers are monkeypatched."""

import pytest
import torch

from nanochat_flyte.config import RunConfig
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.model.device import EvalBatches, Precision, mfu, peak_flops, select_device, select_precision
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.training import loop


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given compute capability and name."""
    def install(capability: tuple[int, int], name: str = "Tesla T4"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return install


def test_select_device(monkeypatch, fake_gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="RunConfig.device: 'cuda' was asked for"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        select_device("tpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    fake_gpu((7, 5))
    assert select_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("capability, dtype, scaler", [((7, 5), torch.float16, True),  # T4
                                                       ((7, 0), torch.float16, True),  # V100
                                                       ((8, 0), torch.bfloat16, False),  # A100
                                                       ((8, 9), torch.bfloat16, False),  # L4
                                                       ((9, 0), torch.bfloat16, False)])  # H100
def test_auto_precision_follows_compute_capability(fake_gpu, capability, dtype, scaler):
    fake_gpu(capability)
    precision = select_precision(torch.device("cuda"), "auto")
    assert (precision.dtype, precision.use_grad_scaler, precision.device_type) == (dtype, scaler, "cuda")


def test_explicit_precision_choices(fake_gpu):
    fake_gpu((7, 5))
    with pytest.raises(ConfigError, match="RunConfig.dtype: bfloat16 needs compute capability >= 8.0"):
        select_precision(torch.device("cuda"), "bfloat16")
    assert select_precision(torch.device("cuda"), "float32").name == "float32"
    cpu = select_precision(torch.device("cpu"))
    assert (cpu.name, cpu.use_grad_scaler) == ("float32", False)
    assert select_precision(torch.device("cpu"), "bfloat16").name == "bfloat16"
    with pytest.raises(ConfigError, match="dtype"):
        select_precision(torch.device("cpu"), "float8")


def test_fp32_autocast_is_a_no_op():
    with Precision(torch.float32, use_grad_scaler=False, device_type="cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_fp16_grad_scaler_path_steps_on_cpu():
    try:
        precision = select_precision(torch.device("cpu"), "float16")
    except ConfigError as error:
        pytest.skip(f"this torch has no CPU fp16 autocast: {error}")
    assert precision.use_grad_scaler
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    before = model.lm_head.weight.detach().clone()
    idx = torch.randint(0, 32, (2, 8))
    with precision.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16
        loss = model(idx, idx)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # no overflow: the scale stays at its initial 2**16
    assert not torch.equal(before, model.lm_head.weight)


def test_peak_flops_table():
    assert peak_flops("Tesla T4", torch.float16) == 65e12
    assert peak_flops("Tesla T4", torch.bfloat16) is None  # Turing has no bf16 tensor cores
    assert peak_flops("NVIDIA A10G", torch.bfloat16) == 70e12  # not mistaken for A10 or A100
    assert peak_flops("NVIDIA A10", torch.bfloat16) == 125e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert peak_flops("NVIDIA L40S", torch.bfloat16) is None  # unlisted, not "L4"
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H200 NVL", torch.bfloat16) == 835e12  # not the SXM part's
    assert peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert peak_flops("Tesla V100-PCIE-32GB", torch.float16) == 112e12  # not the SXM2 part's
    assert peak_flops("Tesla V100S-PCIE-32GB", torch.float16) == 130e12
    assert peak_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb", torch.bfloat16) is None  # a slice: not the whole GPU
    assert peak_flops("cpu", torch.float32) is None


def test_float32_peak_depends_on_tf32(monkeypatch):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 156e12
    assert peak_flops("Tesla T4", torch.float32) == 8.1e12  # no TF32 units


def test_mfu():
    assert mfu(flops_per_token=1e9, tokens_per_sec=13e3, peak=65e12) == pytest.approx(0.2)
    assert mfu(1e9, 65e3, peak_flops("cpu", torch.float32)) is None


def test_eval_batches_shrink_after_an_out_of_memory_error_and_stay_shrunk(capsys):
    seen = []

    def square(batch):  # "out of memory" beyond 3 items, as a GPU would be
        seen.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * item for item in batch]

    limit = 3
    batches = EvalBatches(8, "CORE")
    assert batches.map(range(10), square) == [item * item for item in range(10)]
    assert batches.map(range(4), square) == [0, 1, 4, 9]  # a later evaluation starts at the size that fitted
    assert seen == [8, 4] + [2] * 5 + [2] * 2  # 10 items, then 4, two at a time
    assert capsys.readouterr().out.splitlines() == ["CORE: CUDA out of memory; continuing at batch size 4",
                                                    "CORE: CUDA out of memory; continuing at batch size 2"]
    limit = 0  # not even one item fits: there is no smaller batch to try
    with pytest.raises(RuntimeError, match="CUDA out of memory in chat evaluation at batch size 1"):
        EvalBatches(2, "chat evaluation").map([1, 2, 3, 4], square)
    with pytest.raises(ValueError, match="CORE batch size must be >= 1, got 0"):
        EvalBatches(0, "CORE")


def test_more_torchrun_processes_than_gpus_is_one_line(monkeypatch):
    """(torch's "invalid device ordinal" traceback on the rank that had no GPU, before.)"""
    monkeypatch.setattr(loop, "select_device", lambda name: torch.device("cuda"))  # a node with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^RunConfig\.device: torchrun started process 1 of a node with 1 CUDA "
                                          r"device\(s\): at most one process per device$"):
        loop.training_device(RunConfig(device="cuda"), local_rank=1)
