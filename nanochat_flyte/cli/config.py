"""Check a preset with overrides and write it as one JSON document, the form `pyflyte run --config` takes.

examples:
  nanochat config configs/smoke.yaml data_url=s3://my-bucket/fineweb -o run.json \\
      && pyflyte run workflows/nanochat.py main --config run.json
  nanochat config --chat configs/chat_smoke.yaml num_iterations=4

A bad field stops the `&&` chain with one line naming it; without -o the JSON goes to stdout.
"""

import dataclasses
import json
from pathlib import Path

from nanochat_flyte.cli.usage import ArgumentParser
from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig, load_config
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.schema import parse_overrides

# Each kind of preset, and how this command is told it is one
KIND_FLAGS = {RunConfig: "leave out --chat and --rl", ChatConfig: "add --chat", RLConfig: "add --rl"}


def other_kind_hint(preset: str, kind: type, unknown: str) -> str | None:
    """Which flag a preset of another kind needs (a chat preset given without --chat), or None: only where the
    unknown field is the preset's own (not an override's) and the other kind has every field the preset sets."""
    try:
        fields = set(kind.read_preset(preset))
    except (ConfigError, TypeError):
        return None
    for other, flag in KIND_FLAGS.items():
        names = {field.name for field in dataclasses.fields(other)}
        if other is not kind and unknown in fields and fields <= names:
            return f"{preset} is a {other.__name__} preset: {flag}"
    return None


def check_output(output: Path, preset: str, owner: str) -> None:
    """-o is a file of its own: not the preset it reads (a commented YAML would become one line of JSON), and not in
    a checkpoint's folder, whose config.json records how the checkpoint was trained (the resume checks read it)."""
    from nanochat_flyte.model.checkpoint import CHECKPOINT_FILE, TRAINING_STATE_FILE  # torch: only when writing

    if output.resolve() == Path(preset).resolve():
        raise ConfigError("*", f"-o {str(output)!r} is the preset it reads: write to a file of its own", owner)
    if found := [name for name in (CHECKPOINT_FILE, TRAINING_STATE_FILE) if (output.parent / name).exists()]:
        raise ConfigError("*", f"-o {str(output)!r} is in a checkpoint's folder ({', '.join(found)}), whose files "
                               "record how it was trained: write to a file of its own", owner)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser("config", __doc__)
    parser.add_argument("preset", help="a preset file, e.g. configs/smoke.yaml")
    # (a default, or argparse names the optional overrides among the missing arguments beside the preset)
    parser.add_argument("overrides", nargs="*", default=[], metavar="field=value")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--chat", action="store_true", help="a ChatConfig preset (the chat stage), not a RunConfig")
    kinds.add_argument("--rl", action="store_true", help="an RLConfig preset (reinforcement learning on GSM8K)")
    parser.add_argument("-o", "--output", type=Path, help="write the JSON to this file instead of stdout")
    args = parser.parse_args(argv)
    kind = ChatConfig if args.chat else RLConfig if args.rl else RunConfig
    overrides = parse_overrides(args.overrides, kind)
    try:
        config = load_config(args.preset, kind, **overrides).validate()
    except ConfigError as error:
        if error.problem.startswith("unknown field") and (hint := other_kind_hint(args.preset, kind, error.field)):
            raise ConfigError(error.field, f"{error.problem.split(';')[0]}; {hint}", kind.__name__) from None
        raise
    text = json.dumps(config.to_dict())
    if args.output:
        check_output(args.output, args.preset, kind.__name__)
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
        except OSError as error:
            raise ConfigError("*", f"cannot write -o {str(args.output)!r}: {error.strerror}", kind.__name__) from None
    else:
        print(text)
