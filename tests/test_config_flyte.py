"""RunConfig through Flyte's type engine: what registration, the console and `pyflyte run` do to it.

A relaunch from the console sends back the JSON the user edited (a protobuf Struct, all numbers as floats);
`pyflyte run --config` parses inline JSON or a YAML/JSON file. Both may leave fields out: those take defaults.
"""

import dataclasses
import json
from pathlib import Path

import msgpack
import pytest
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.interaction.click_types import JsonParamType
from flytekit.models.literals import Binary, Literal, Scalar
from google.protobuf.struct_pb2 import Struct

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from workflows import support  # noqa: F401 - reads pyflyte's --config as the library does: part of what is tested

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def to_literal(config: RunConfig) -> Literal:
    ctx = FlyteContextManager.current_context()
    return TypeEngine.to_literal(ctx, config, RunConfig, TypeEngine.to_literal_type(RunConfig))


def to_config(literal: Literal) -> RunConfig:
    return TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, RunConfig)


def console_literal(values: dict) -> Literal:
    """What the console sends on a relaunch with edited inputs: the JSON as a generic Struct."""
    struct = Struct()
    struct.update(values)
    return Literal(scalar=Scalar(generic=struct))


@pytest.mark.parametrize("config", [
    RunConfig(),
    RunConfig.from_file(CONFIGS / "d8_t4.yaml"),
    RunConfig.from_file(CONFIGS / "smoke.yaml"),
    RunConfig(run_name="edited", depth=12, tokenizer="bpe", data_url="s3://bucket/shards", compile=False,
              sample_temperature=0.7, wandb_mode="disabled"),
], ids=["defaults", "d8_t4", "smoke", "edited"])
def test_round_trip_through_literal(config):
    literal = to_literal(config)
    assert literal.scalar.binary is not None, "flytekit >= 1.14 stores dataclasses as msgpack"
    assert to_config(literal) == config


def test_console_relaunch_with_edited_json():
    shown = json.loads(json.dumps(dataclasses.asdict(RunConfig())))  # the JSON the console shows
    shown.update(depth=10, num_iterations=2000, data_url="gs://mirror/fineweb", compile=False)
    config = to_config(console_literal(shown))
    assert config == RunConfig(depth=10, num_iterations=2000, data_url="gs://mirror/fineweb", compile=False)
    assert isinstance(config.num_iterations, int) and isinstance(config.total_batch_size, int)  # not 2000.0
    assert to_config(to_literal(config)) == config


def test_console_relaunch_with_partial_json_takes_defaults():
    config = to_config(console_literal({"depth": 4, "num_iterations": 10}))
    assert config == RunConfig(depth=4, num_iterations=10)


def test_partial_msgpack_takes_defaults():
    partial = Literal(scalar=Scalar(binary=Binary(value=msgpack.dumps({"depth": 4, "embedding_lr": 1}),
                                                  tag="msgpack")))
    config = to_config(partial)
    assert config == RunConfig(depth=4, embedding_lr=1.0)
    assert isinstance(config.embedding_lr, float)


def test_pyflyte_run_inline_partial_json():
    config = JsonParamType(RunConfig).convert('{"depth": 3, "warmup_ratio": 0}', None, None)
    assert config == RunConfig(depth=3, warmup_ratio=0.0)
    assert to_config(to_literal(config)) == config


@pytest.mark.parametrize("preset", ["d8_t4.yaml", "smoke.yaml"])
def test_pyflyte_run_yaml_preset_matches_from_file(preset):
    config = JsonParamType(RunConfig).convert(str(CONFIGS / preset), None, None)
    assert config == RunConfig.from_file(CONFIGS / preset)
    assert to_config(to_literal(config)) == config


# ---------------------------------------------------------------------- a misspelt field fails on every way in

def test_an_unknown_field_in_a_console_relaunch_is_named():
    with pytest.raises(Exception, match=r"RunConfig\.num_iteration: unknown field; did you mean num_iterations\?"):
        to_config(console_literal({"num_iteration": 40}))


def test_an_unknown_field_in_a_msgpack_literal_is_named():
    literal = Literal(scalar=Scalar(binary=Binary(value=msgpack.dumps({"depht": 2}), tag="msgpack")))
    with pytest.raises(Exception, match=r"RunConfig\.depht: unknown field; did you mean depth\?"):
        to_config(literal)


@pytest.mark.parametrize("value", ['{"depht": 2}', "YAML"])
def test_pyflyte_run_rejects_an_unknown_field_as_a_bad_parameter(tmp_path, value):
    import click
    if value == "YAML":
        value = str(tmp_path / "typo.yaml")
        (tmp_path / "typo.yaml").write_text("num_iteration: 40\n")
    with pytest.raises(click.BadParameter, match=r"RunConfig\.(depht|num_iteration): unknown field; did you mean"):
        JsonParamType(RunConfig).convert(value, None, None)


def test_pyflyte_run_rejects_a_bad_value_before_the_run():
    import click
    with pytest.raises(click.BadParameter, match=r"^RunConfig\.depth: must be >= 1, got 0$"):
        JsonParamType(RunConfig).convert('{"depth": 0}', None, None)


# ---------------------------------------------------------------------- the chat stage's and RL's configs alike

@pytest.mark.parametrize("kind, preset, edits, typo", [
    (ChatConfig, "chat_d8_t4.yaml", {"max_conversations": 500.0, "eval_tasks": "gsm8k"}, "mmlu_epoch"),
    (RLConfig, "rl_d8_t4.yaml", {"num_samples": 8.0, "temperature": 1, "eval_problems": 100.0}, "num_sample"),
])
def test_chat_and_rl_configs_round_trip_relaunch_edited_and_name_a_typo(kind, preset, edits, typo):
    ctx = FlyteContextManager.current_context()
    config = kind.from_file(CONFIGS / preset)
    literal = TypeEngine.to_literal(ctx, config, kind, TypeEngine.to_literal_type(kind))
    assert TypeEngine.to_python_value(ctx, literal, kind) == config
    # a console relaunch: the shown JSON with some fields edited, numbers as floats
    shown = json.loads(json.dumps(dataclasses.asdict(config))) | edits
    relaunched = TypeEngine.to_python_value(ctx, console_literal(shown), kind)
    assert relaunched == kind.from_mapping({**config.to_dict(), **edits})
    assert all(type(getattr(relaunched, field)) is type(getattr(config, field)) for field in edits)
    with pytest.raises(Exception, match=rf"{kind.__name__}\.{typo}: unknown field; did you mean"):
        TypeEngine.to_python_value(ctx, console_literal({typo: 2}), kind)


def test_a_console_relaunch_with_a_nan_is_named():
    # the console's JSON cannot hold NaN, but a msgpack literal (flytectl, the SDK) can: no NaN learning rate trains
    literal = Literal(scalar=Scalar(binary=Binary(value=msgpack.dumps({"matrix_lr": float("nan")}), tag="msgpack")))
    with pytest.raises(Exception, match=r"RunConfig\.matrix_lr: must be a finite number, got nan"):
        to_config(literal)
