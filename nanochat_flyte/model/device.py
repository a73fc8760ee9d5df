"""Which device to train on, in which precision, how close to the hardware's peak it runs (MFU), evaluation
batches that shrink to fit the device's memory, and this process's place among the ranks.

Precision follows the hardware: bf16 autocast from Ampere (compute capability 8.0) on; fp16 autocast with
a GradScaler below it (T4, V100: no bf16 tensor cores); plain float32 on CPU and Apple MPS.
"""

import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat_flyte.config import CUDA_GRAPH_COMPILE_MODES
from nanochat_flyte.errors import ConfigError

BF16_MIN_CAPABILITY = (8, 0)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Dense (no 2:4 sparsity) peak FLOP/s per GPU from NVIDIA's datasheets; "tf32" is what float32 matmuls reach
# when torch allows TF32, "float32" the CUDA-core rate. Keys match torch.cuda.get_device_name() as whole words.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "T4": {"float16": 65e12, "float32": 8.1e12},  # Turing: no bf16, no TF32
    "V100": {"float16": 125e12, "float32": 15.7e12},  # Volta, as T4; SXM2: "Tesla V100-SXM2-16GB"
    "V100-PCIE": {"float16": 112e12, "float32": 14e12},  # "Tesla V100-PCIE-32GB"
    "V100S": {"float16": 130e12, "float32": 16.4e12},  # "Tesla V100S-PCIE-32GB"
    # NVIDIA publishes no A10G datasheet. Cloud comparisons of A10 and A10G list the A10G at about 70e12
    # dense fp16/bf16 (its GA102 tensor cores at the consumer rate), not the A10 datasheet's 125e12: the
    # least certain row here.
    "A10G": {"float16": 70e12, "bfloat16": 70e12},
    "A10": {"float16": 125e12, "bfloat16": 125e12, "tf32": 62.5e12, "float32": 31.2e12},
    "L4": {"float16": 121e12, "bfloat16": 121e12, "tf32": 60e12, "float32": 30.3e12},
    "A100": {"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},  # SXM and PCIe
    "H100": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494.7e12, "float32": 67e12},  # SXM: "H100 80GB HBM3"
    "H100 PCIe": {"float16": 756e12, "bfloat16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H100 NVL": {"float16": 835e12, "bfloat16": 835e12, "tf32": 417.5e12, "float32": 60e12},
    "H200": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494.7e12, "float32": 67e12},  # H100 SXM compute
    "H200 NVL": {"float16": 835e12, "bfloat16": 835e12, "tf32": 417.5e12, "float32": 60e12},  # H100 NVL compute
}


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile in one of config.COMPILE_MODES; "default" is torch's own default mode."""
    return torch.compile(model, mode=None if mode == "default" else mode)


def replays_cuda_graphs(compile: bool, mode: str, device: torch.device) -> bool:
    """Whether a model compiled (compile: torch.compile is asked for) in `mode` replays CUDA graphs: on a CUDA
    device, in one of config.CUDA_GRAPH_COMPILE_MODES. Their outputs live in memory the next replay writes over."""
    return compile and mode in CUDA_GRAPH_COMPILE_MODES and device.type == "cuda"


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) in the process group that training made, else (0, 1): a process of its own."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def select_device(name: str = "auto") -> torch.device:
    """auto: cuda, else mps, else cpu. Asking for a device that is not there is an error, not a fallback."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, present in available.items() if present))
    if name not in available:
        raise ConfigError("device", f"unknown device {name!r}; choose auto, cuda, mps or cpu")
    if not available[name]:
        raise ConfigError("device", f"{name!r} was asked for but torch {torch.__version__} sees no {name} device")
    return torch.device(name)


@dataclass
class Precision:
    dtype: torch.dtype  # the autocast dtype; parameters and optimizer state stay float32
    use_grad_scaler: bool  # fp16 gradients underflow without loss scaling
    device_type: str = "cuda"

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch really autocasts to dtype on device_type (it warns and disables itself if not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=dtype):
            return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype


def select_precision(device: torch.device, dtype_name: str = "auto") -> Precision:
    if dtype_name not in ("auto", *DTYPES):
        raise ConfigError("dtype", f"unknown dtype {dtype_name!r}; choose auto, {', '.join(DTYPES)}")
    if device.type == "cuda":  # CUDA autocasts to both 16-bit types; bf16 is fast only from Ampere on
        capability = torch.cuda.get_device_capability(device)
        has_bf16 = capability >= BF16_MIN_CAPABILITY
        if dtype_name == "auto":
            dtype_name = "bfloat16" if has_bf16 else "float16"
        if dtype_name == "bfloat16" and not has_bf16:
            raise ConfigError("dtype", f"bfloat16 needs compute capability >= 8.0 (Ampere); "
                                       f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: "
                                       "use float16 (auto picks it)")
    elif dtype_name == "auto":
        dtype_name = "float32"
    elif dtype_name != "float32" and not autocast_supported(device.type, DTYPES[dtype_name]):
        raise ConfigError("dtype", f"torch {torch.__version__} cannot autocast to {dtype_name} on {device.type}; "
                                   "use float32 (auto picks it)")
    dtype = DTYPES[dtype_name]
    return Precision(dtype=dtype, use_grad_scaler=dtype == torch.float16, device_type=device.type)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for matmuls in dtype, or None when we do not know it (CPU, unlisted GPU, a MIG
    slice: "NVIDIA A100-SXM4-40GB MIG 1g.5gb" has a fraction of the GPU's tensor cores)."""
    if re.search(r"\bMIG\b", device_name):
        return None
    matches = [key for key in PEAK_FLOPS if re.search(rf"\b{re.escape(key)}\b", device_name, re.IGNORECASE)]
    if not matches:
        return None
    rates = PEAK_FLOPS[max(matches, key=len)]  # the most specific name: "H100 PCIe" over "H100"
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return rates.get("tf32", rates.get("float32"))  # no TF32 units (T4): matmuls stay plain float32
    return rates.get(dtype_name)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak FLOP/s of one device (give this device's tokens/s)."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_sec / peak


class EvalBatches:
    """Evaluation in batches of `size` items, with an out-of-memory fallback: a batch that does not fit on the GPU
    (a CUDA out-of-memory error) is retried at half the size, which then holds for the rest of the evaluation.
    Evaluation results never depend on the batch size, only its speed does; training has its own fallback, which
    keeps the total batch (training/loop.py)."""

    def __init__(self, size: int, what: str = "evaluation"):
        if size < 1:
            raise ValueError(f"{what} batch size must be >= 1, got {size}")
        self.size, self.what = size, what

    def map(self, items: Sequence, work: Callable[[Sequence], list]) -> list:
        """work(batch) for consecutive batches of items: its results (one per item), concatenated."""
        results: list = []
        while len(results) < len(items):
            try:
                results += work(items[len(results):len(results) + self.size])
                continue
            except torch.cuda.OutOfMemoryError as error:
                if self.size == 1:
                    raise RuntimeError(f"CUDA out of memory in {self.what} at batch size 1: the model's "
                                       "activations for one sequence do not fit") from error
            # out of the except block: the error's frames, and the tensors they held, are released
            self.size //= 2
            torch.cuda.empty_cache()
            print(f"{self.what}: CUDA out of memory; continuing at batch size {self.size}", flush=True)
        return results
