"""RL rollout throughput: sampled answers per second when a whole step's answers decode together, against one
problem's answers at a time (nanochat's way), through the real rollout code (chat_rl.Rollouts).

    python bench/rl_rollout_throughput.py                                    # d8, random weights, context 512
    python bench/rl_rollout_throughput.py --depth 2 --problems 4 --num-samples 8 --max-new-tokens 32 --device cpu
    python bench/rl_rollout_throughput.py --checkpoint runs/smoke_chat       # a trained chat model

For each of --decode-batch-sizes (RLConfig.decode_batch_size: answers decoded together; 0 = the whole step) it rolls
out the same --problems GSM8K-style problems with --num-samples answers each, with the same seeds, so every setting
does the same work, and prints answers/s, generated tokens/s, and each setting's speed against the first. A random
model never samples a stop token, so each answer runs to --max-new-tokens; a trained one stops when it is done.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.hub_server, when run as a script

from nanochat_flyte.config import DEVICES, RLConfig, RunConfig  # noqa: E402
from nanochat_flyte.data.chat_data import gsm8k_item  # noqa: E402
from nanochat_flyte.data.tokenizer import save_tokenizer  # noqa: E402
from nanochat_flyte.model.checkpoint import TOKENIZER_DIR, load_model  # noqa: E402
from nanochat_flyte.model.device import select_device, select_precision  # noqa: E402
from nanochat_flyte.training.rl import ReinforcementLearning, Rollouts  # noqa: E402
from tests.helpers import random_gpt  # noqa: E402
from tests.hub_server import GSM8K  # noqa: E402  (generated problems in GSM8K's shape: the GPU machine is offline)


def write_problems(directory: Path) -> None:
    items = [json.dumps(gsm8k_item(row, index)) + "\n" for index, row in enumerate(GSM8K)]
    (directory / "train.jsonl").write_text("".join(items))
    (directory / "val.jsonl").write_text("".join(items[:1]))
    (directory / "manifest.json").write_text(json.dumps({"endpoint": "generated", "seed": 0, "max_problems": 0,
                                                         "eval_problems": 1}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained chat checkpoint instead of a randomly initialised model")
    parser.add_argument("--depth", type=int, default=8, help="of the random model")
    parser.add_argument("--seq-len", type=int, default=512, help="context of the random model")
    parser.add_argument("--problems", type=int, default=8, help="problems in the step")
    parser.add_argument("--num-samples", type=int, default=16, help="answers per problem")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--decode-batch-sizes", default="16,0", help="comma-separated; 0: the whole step at once")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    args = parser.parse_args(argv)

    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.checkpoint:
            loaded = load_model(args.checkpoint, device)
            model, tokenizer = loaded.model, loaded.tokenizer
        else:
            model, tokenizer = random_gpt(args.depth, args.seq_len, device)
        save_tokenizer(tokenizer, scratch / TOKENIZER_DIR)
        write_problems(scratch)
        config = RunConfig(max_seq_len=model.config.sequence_len)
        precision = select_precision(device, "auto")
        results, first_rate = {}, None
        for decode_batch_size in [int(size) for size in args.decode_batch_sizes.split(",")]:
            rl = RLConfig(examples_per_step=args.problems, num_samples=args.num_samples,
                          max_new_tokens=args.max_new_tokens, decode_batch_size=decode_batch_size)
            phase = ReinforcementLearning(config, rl, scratch, scratch)
            phase.attach(model, precision)
            rollouts = Rollouts(phase, batch_size=args.num_samples, device=device, rank=0, world_size=1, state=None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            answered = rollouts.roll_out(args.problems)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            answers = len(rollouts.answer_lengths)
            rate = answers / seconds
            first_rate = first_rate or rate
            results[decode_batch_size] = {"seconds": seconds, "answers_per_s": rate,
                                          "tokens_per_s": sum(rollouts.answer_lengths) / seconds,
                                          "speedup": rate / first_rate,
                                          "rollouts": [rollout.tokens for rollout in answered]}  # prompt + answer
            label = "the whole step" if decode_batch_size == 0 else f"{decode_batch_size} answers"
            print(f"decode {label} at a time: {answers} answers ({sum(rollouts.answer_lengths):,} tokens) in "
                  f"{seconds:.2f} s: {rate:.2f} answers/s, {results[decode_batch_size]['tokens_per_s']:.1f} tokens/s, "
                  f"x{rate / first_rate:.2f} against the first setting ({device.type})", flush=True)
    return results


if __name__ == "__main__":
    main()
