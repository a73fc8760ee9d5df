"""The optimizers' step at the reference model: how many operations the host dispatches, and how long it takes.

    python bench/optimizer_step.py                       # d8, GPT-2's vocabulary, on the CPU
    python bench/optimizer_step.py --device cuda --depth 12

For Muon one matrix at a time and batched (RunConfig.muon_batched), and for AdamW, after one untimed step (the
optimizer states are allocated there): the ATen operations one step dispatches that compute (each a kernel launch or
more on a GPU; views, which launch nothing, are left out), on CUDA the kernels the GPU ran, and the step's time, the
median of --repeats. On a GPU whose step waits for the host, fewer dispatches are a shorter step.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from a bare checkout (the GPU machine)

from nanochat_flyte.config import RunConfig  # noqa: E402
from nanochat_flyte.model.gpt import GPT, GPTConfig  # noqa: E402
from nanochat_flyte.model.optim import build_optimizers  # noqa: E402

GPT2_VOCAB_SIZE = 50257
# operations that only make another view of a tensor: they launch nothing
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::mT", "aten::t", "aten::transpose",
         "aten::unbind", "aten::select", "aten::slice", "aten::as_strided", "aten::expand", "aten::unsqueeze",
         "aten::squeeze", "aten::alias", "aten::detach"}


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(optimizer: torch.optim.Optimizer, device: torch.device, repeats: int) -> dict:
    optimizer.step()  # allocates the states
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        optimizer.step()
        synchronized(device)
    events = profiled.events()
    # an ATen operation called from Python, not one that another operation calls inside it, nor a view
    dispatched = [e for e in events if e.name.startswith("aten::") and e.name not in VIEWS
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    seconds = []
    for _ in range(repeats):
        synchronized(device)
        start = time.perf_counter()
        optimizer.step()
        synchronized(device)
        seconds.append(time.perf_counter() - start)
    return {"aten_calls": len(dispatched), "cuda_kernels": len(kernels) if device.type == "cuda" else None,
            "ms": 1000 * statistics.median(seconds)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, GPT2_VOCAB_SIZE, 512)).to(device)
    model.init_weights()
    for parameter in model.parameters():  # any gradient: the step's work does not depend on its values
        parameter.grad = torch.randn_like(parameter)
    results = {"device": str(device), "depth": args.depth, "torch": torch.__version__}
    for batched in (False, True):
        adamw, muon = build_optimizers(model, RunConfig(muon_batched=batched))
        results["muon_batched" if batched else "muon"] = measure(muon, device, args.repeats)
    results["adamw"] = measure(adamw, device, args.repeats)
    print(f"optimizer step, depth {args.depth} on {device}:")
    for name in ("muon", "muon_batched", "adamw"):
        figures = results[name]
        kernels = f", {figures['cuda_kernels']:,} CUDA kernels" if figures["cuda_kernels"] is not None else ""
        print(f"  {name:13s} {figures['aten_calls']:6,} ATen calls{kernels}, {figures['ms']:8.2f} ms")
    print(f"  batched Muon dispatches {results['muon_batched']['aten_calls'] / results['muon']['aten_calls']:.3f} "
          "of one matrix at a time's calls")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
