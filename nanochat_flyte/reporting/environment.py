"""The environment report: what the machine that trains looks like, printed once and kept with the results.

The workflows' describe_training_node runs on the same kind of node as training, so this is the GPU training will
get.
"""

import os
import platform
from pathlib import Path

import torch


def wandb_key_available() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY or a netrc entry. Never reads the key out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def total_ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # sysconf names are missing on some platforms (Windows)
        return None


def gpu_report() -> dict:
    if not torch.cuda.is_available():
        return {"gpu_count": 0, "gpu_name": None, "gpu_memory_gib": None, "compute_capability": None,
                "bf16_supported": False}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu_count": torch.cuda.device_count(),
        "gpu_name": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16_supported": props.major >= 8,  # Ampere and newer; a T4 (7.5) trains in fp16 instead
    }


def environment_report() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mps_available": torch.backends.mps.is_available(),
        **gpu_report(),
        "cpu_count": os.cpu_count(),
        "ram_gib": total_ram_gib(),
        "wandb_key_available": wandb_key_available(),
    }


def format_report(report: dict) -> str:
    width = max(map(len, report))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in report.items())
