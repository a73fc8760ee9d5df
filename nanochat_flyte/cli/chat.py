"""Talk to a checkpoint in the terminal: a multi-turn chat with the answer streamed as it is written.

examples:
  nanochat chat --checkpoint runs/chat
  nanochat chat --checkpoint runs/chat --prompt "Why is the sky blue?" --seed 1    # answer once, exit

In the chat, /clear starts a new conversation and /quit (or Ctrl-D) leaves. A base checkpoint (no chat
fine-tuning) cannot hold a conversation: each message is then continued as plain text, and the chat says so.
"""

import dataclasses
import itertools
import sys

from nanochat_flyte.cli.sample import add_sampling_flags, sampling_params
from nanochat_flyte.cli.usage import ArgumentParser, require_checkpoint_flag
from nanochat_flyte.errors import UserError
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.inference.engine import CHAT_TEMPERATURE, Engine, SamplingParams

BASE_MODEL_NOTE = ("note: this is a BASE checkpoint (no chat fine-tuning): each message is continued as plain "
                   "text, without the earlier turns")


def answer(engine: Engine, messages: list[dict], params: SamplingParams) -> str:
    """Stream the assistant's reply to messages onto stdout; return it."""
    sequence = engine.sequence(engine.chat_prompt(messages), params)
    reply = []
    for delta in engine.decode(sequence):
        print(shown(delta, marked=sys.stdout.isatty()), end="", flush=True)
        reply.append(delta)
    print(flush=True)
    if sequence.finish_reason == "length":  # on stderr: a script reading the answer gets the answer only
        print("(cut at the token limit)", file=sys.stderr, flush=True)
    return "".join(reply)


def chat(engine: Engine, params: SamplingParams) -> None:
    print(f"nanochat: {engine.phase} checkpoint, context {engine.context} tokens. /clear starts over, /quit leaves.")
    if not engine.chat_mode:
        print(BASE_MODEL_NOTE)
    messages: list[dict] = []
    for turn in itertools.count():
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/quit":
            return
        if text == "/clear":
            messages = []
            print("(new conversation)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        try:
            # a new seed each turn: asking again gives another sample, the session stays reproducible from --seed
            reply = answer(engine, messages, dataclasses.replace(params, seed=params.seed + turn))
        except ValueError as error:  # the conversation no longer fits the context
            messages.pop()
            print(f"\nerror: {error}; /clear starts a new conversation")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            messages.pop()
            print("\n(stopped)")
            continue
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser("chat", __doc__)
    parser.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    # answers of up to 512 tokens (the context may cut them), sampled at nanochat's chat temperature
    add_sampling_flags(parser, max_tokens=512, temperature=CHAT_TEMPERATURE, temperature_help="0 = greedy")
    args = parser.parse_args(argv)
    params = sampling_params(parser, args)
    if args.prompt is not None and not args.prompt.strip():  # (the interactive chat skips an empty line)
        parser.error("--prompt: give a message to answer; it is empty")
    require_checkpoint_flag(parser, args.checkpoint)
    engine = Engine.from_checkpoint(args.checkpoint, args.device, compile=args.compile)
    if args.prompt is None:
        chat(engine, params)
        return
    if not engine.chat_mode:
        print(BASE_MODEL_NOTE, file=sys.stderr)
    try:
        answer(engine, [{"role": "user", "content": args.prompt}], params)
    except ValueError as error:  # a prompt longer than the context
        raise UserError(f"--{error}") from None

