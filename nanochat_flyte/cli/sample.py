"""Continue a prompt with a checkpoint, local or remote.

examples:
  nanochat sample --checkpoint runs/base --prompt "The capital of France is"
  nanochat sample --checkpoint s3://bucket/base --prompt "Once upon a time" --max-tokens 64 --temperature 0.8 --seed 7

A checkpoint is a directory or any fsspec URI to one: s3://, gs://, file://. Greedy by default.
"""

import argparse
import math
import sys

from nanochat_flyte.cli.usage import (
    ArgumentParser,
    add_checkpoint_flag,
    add_compile_flag,
    add_device_flag,
    require_checkpoint_flag,
)
from nanochat_flyte.errors import UserError
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.inference.engine import DEFAULT_TOP_K, Engine, SamplingParams

MAX_SEED = 2**63 - 1  # a non-negative int64; the chat adds its turn count, still within torch's 2**64 - 1


def seed_flag(text: str) -> int:
    """--seed, checked by argparse: an error names the flag, and comes before the model loads."""
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text!r}")
    return seed


def temperature_flag(text: str) -> float:
    """--temperature, checked by argparse: float() also reads nan and inf, which sample nothing sensible."""
    try:
        temperature = float(text)
    except ValueError:
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return temperature


def add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int, temperature: float, temperature_help: str
                       ) -> None:
    """The flags every sampling front end takes (sample, chat), each checked before the model loads."""
    add_checkpoint_flag(parser)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=temperature_flag, default=temperature, help=temperature_help)
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="0 = the whole vocabulary")
    parser.add_argument("--seed", type=seed_flag, default=42)
    add_device_flag(parser)
    add_compile_flag(parser)


def sampling_params(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingParams:
    """The flags' SamplingParams, checked: a bad one is a usage error naming its flag (`--top-k: ...`)."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                            seed=args.seed)
    try:
        params.validate()
    except ValueError as error:
        parser.error(f"--{str(error).replace('_', '-')}")
    return params


def main(argv: list[str] | None = None) -> str:
    parser = ArgumentParser("sample", __doc__)
    parser.add_argument("--prompt", required=True)
    # greedy by default, as the samples taken during training: the same prompt gives the same text
    add_sampling_flags(parser, max_tokens=64, temperature=0.0, temperature_help="0 = greedy (the default)")
    args = parser.parse_args(argv)
    params = sampling_params(parser, args)
    require_checkpoint_flag(parser, args.checkpoint)
    engine = Engine.from_checkpoint(args.checkpoint, args.device, compile=args.compile)
    try:
        completion = engine.complete(args.prompt, params)
    except ValueError as error:  # a prompt that fills the model's context
        raise UserError(f"--{error}") from None
    print(shown(args.prompt + completion.text, marked=sys.stdout.isatty()), flush=True)
    if completion.finish_reason == "length" and len(completion.tokens) < params.max_tokens:  # on stderr, as chat's
        print(f"(stopped at the end of the model's context of {engine.context} tokens)", file=sys.stderr, flush=True)
    return completion.text

