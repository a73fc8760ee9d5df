"""Generate text from a saved checkpoint, local or remote.

    python -m nanochat_flyte.sample --checkpoint DIR_OR_URI --prompt "The capital of France is" \
        [--max-tokens 64 --temperature 0 --top-k 50 --seed 42 --device auto]

DIR_OR_URI is a checkpoint directory (docs/architecture.md) or any fsspec URI to one: s3://, gs://, file://.
"""


from nanochat_flyte.cli import ArgumentParser
from nanochat_flyte.engine import Engine, SamplingParams


def main(argv: list[str] | None = None) -> str:
    parser = ArgumentParser("nanochat_flyte.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or fsspec URI (s3://, gs://, ...)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    # greedy by default, as the samples taken during training: the same prompt gives the same text
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = the whole vocabulary")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")

    engine = Engine.from_checkpoint(args.checkpoint, args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                            seed=args.seed)
    completion = engine.complete(args.prompt, params).text
    print(args.prompt + completion, flush=True)
    return completion


if __name__ == "__main__":
    from nanochat_flyte.cli import run

    run(main)
