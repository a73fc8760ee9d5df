import dataclasses
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from nanochat_flyte.cli.config import main as config_main
from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig, load_config
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.model.gpt import GPTConfig
from nanochat_flyte.schema import YamlLoader

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_reference_run():
    config = RunConfig()
    assert (config.depth, config.max_seq_len, config.device_batch_size, config.total_batch_size) == (8, 512, 16, 65536)
    assert (config.num_iterations, config.eval_every, config.sample_every, config.num_shards) == (1000, 100, 500, 50)
    assert (config.wandb_project, config.tokenizer, config.val_shard) == ("nanochat", "gpt2", 1822)
    assert config.grad_accum_steps() == 8  # 65536 / (16 * 512)
    assert config.data_url.endswith("karpathy/fineweb-edu-100b-shuffle/resolve/main")


def test_reference_preset_matches_defaults_and_validates():
    preset = RunConfig.from_file(CONFIGS / "d8_t4.yaml").validate()
    assert preset == RunConfig()


def test_tuned_preset_is_the_reference_run_with_three_changes():
    tuned = RunConfig.from_file(CONFIGS / "d8_t4_tuned.yaml").validate()
    assert tuned == dataclasses.replace(RunConfig(), warmdown_ratio=0.4, residual_scalars=True, scalar_lr=0.2)


def test_every_preset_validates():
    kinds = {"chat": ChatConfig, "rl": RLConfig}  # chat_*.yaml: the chat stage's presets; rl_*.yaml: RL's
    presets = sorted(CONFIGS.glob("*.yaml"))
    assert {"smoke.yaml", "d8_t4.yaml", "chat_smoke.yaml", "rl_smoke.yaml"} <= {path.name for path in presets}
    for path in presets:
        kinds.get(path.name.split("_")[0], RunConfig).from_file(path).validate()


def test_preset_sets_only_some_fields():
    smoke = RunConfig.from_file(CONFIGS / "smoke.yaml")
    assert smoke.num_shards == 1 and smoke.depth < 8
    assert smoke.wandb_project == "nanochat"  # not in the preset: keeps its default


def test_empty_run_name_is_derived_from_depth_and_time():
    config = RunConfig(depth=4).resolved(now=datetime(2026, 11, 24, 9, 30, 5))
    assert config.run_name == "nanochat_d4_flyte_20261124_093005"
    assert RunConfig(run_name="mine").resolved().run_name == "mine"


@pytest.mark.parametrize("changes, field", [
    (dict(depth=0), "depth"),
    (dict(total_batch_size=65536 + 1), "total_batch_size"),
    (dict(num_shards=0), "num_shards"),
    (dict(tokenizer="sentencepiece"), "tokenizer"),
    (dict(wandb_mode="sometimes"), "wandb_mode"),
    (dict(compile_mode="fast"), "compile_mode"),
    (dict(compile=False, compile_mode="reduce-overhead"), "compile_mode"),  # no CUDA graphs without a word
    (dict(val_shard=3, num_shards=10), "val_shard"),
    (dict(data_url=""), "data_url"),
    (dict(eval_tokens=100), "eval_tokens"),
    (dict(tokenizer="bpe", bpe_vocab_size=70000), "bpe_vocab_size"),
    (dict(warmup_ratio=0.9, warmdown_ratio=0.2), "warmdown_ratio"),
    (dict(tokenizer="bpe", bpe_train_chars=0), "bpe_train_chars"),
    (dict(core_max_per_task=10), "core_max_per_task"),  # nanochat's bundle has 10-shot tasks
    (dict(core_metric_every=5, eval_bundle_url=""), "core_metric_every"),  # CORE during training: silently off
    (dict(core_metric_every=5, evaluate_core=False), "core_metric_every"),
    (dict(depth=5), "depth"),  # 320 wide does not split into 3 heads: refused before any download, not in training
    (dict(save_to="runs/base "), "save_to"),  # a folder "base " beside the "base" meant
    (dict(data_url="/data/fineweb "), "data_url"),  # was taken, and found unreachable only when probed
    (dict(eval_bundle_url=" /data/eval_bundle.zip"), "eval_bundle_url"),
    (dict(embedding_lr=0, unembedding_lr=0, matrix_lr=0), "matrix_lr"),  # nothing would train
    (dict(embedding_lr=0, unembedding_lr=0, matrix_lr=0, scalar_lr=0, residual_scalars=True), "matrix_lr"),
])
def test_bad_values_name_their_field(changes, field):
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(RunConfig(), **changes).validate()
    assert error.value.field == field
    assert str(error.value).startswith(f"RunConfig.{field}: ")
    assert "\n" not in str(error.value)


def test_every_depth_that_validates_builds_its_model_and_no_other():
    for depth in range(1, 40):
        try:
            RunConfig(depth=depth).validate()
        except ConfigError:
            with pytest.raises(ConfigError, match="depth"):
                GPTConfig.from_depth(depth, 100, 16)
        else:
            assert GPTConfig.from_depth(depth, 100, 16).n_embd == 64 * depth
    with pytest.raises(ConfigError, match=r"use an even depth \(4 or 6\)"):
        RunConfig(depth=5).validate()


@pytest.mark.parametrize("overrides, line", [
    # depth: width = 64 x depth, so parameters grow as depth cubed; such a depth died allocating, after data prep
    (["depth=1000000"], "RunConfig.depth: must be <= 64 (nanochat's largest runs are ~32), got 1000000: width "
                        "64,000,000 and ~4.9e+22 parameters in its blocks"),
    (["depth=1e3"], "RunConfig.depth: must be <= 64 (nanochat's largest runs are ~32), got 1000: width 64,000 and "
                    "~4.9e+13 parameters in its blocks"),
    # shards: FineWeb-Edu's at the default data_url; what 5-digit names count elsewhere
    (["num_shards=1823"], "RunConfig.num_shards: must be <= 1822 (FineWeb-Edu has shards 0..1822, and val_shard is "
                          "apart), got 1823"),  # (named val_shard before: "shard 1822 is also a train shard")
    (["val_shard=5000"], "RunConfig.val_shard: must be <= 1822 (FineWeb-Edu has shards 0..1822), got 5000"),
    (["data_url=/tmp/doc_corpus", "num_shards=100000000", "val_shard=100000000"],
     "RunConfig.num_shards: must be <= 99999 (shard names have 5 digits: shard_00000..shard_99999, and val_shard is "
     "apart), got 100000000"),
    (["data_url=/tmp/doc_corpus", "val_shard=100000"],
     "RunConfig.val_shard: must be <= 99999 (shard names have 5 digits: shard_00000..shard_99999), got 100000"),
    # W&B names: refused by W&B at training start, which then went on without tracking
    (["wandb_project=my/project"], "RunConfig.wandb_project: 'my/project' contains /, which W&B refuses in its "
                                   "names (any of / \\ # ? % :)"),
    (["wandb_project=a:b?c"], "RunConfig.wandb_project: 'a:b?c' contains : ?, which W&B refuses in its names "
                              "(any of / \\ # ? % :)"),
    (["wandb_entity=team#1"], "RunConfig.wandb_entity: 'team#1' contains #, which W&B refuses in its names "
                              "(any of / \\ # ? % :)"),
    ([f"wandb_project={'p' * 129}"], "RunConfig.wandb_project: W&B takes at most 128 characters, got 129"),
])
def test_sizes_and_names_beyond_what_can_run_are_one_line_before_anything_runs(overrides, line):
    with pytest.raises(ConfigError) as error:
        config_main([str(CONFIGS / "smoke.yaml"), *overrides])
    assert str(error.value) == line


def test_the_largest_values_that_can_run_still_validate():
    RunConfig(depth=64).validate()
    RunConfig(num_shards=1822).validate()  # every FineWeb-Edu shard but the validation one
    RunConfig(data_url="/data/mine", num_shards=99_999, val_shard=99_999).validate()  # another source's
    RLConfig(hf_endpoint="http://127.0.0.1:8766", wandb_project="nanochat-rl_2", wandb_entity="my-team").validate()


@pytest.mark.parametrize("kind", [ChatConfig, RLConfig])
@pytest.mark.parametrize("endpoint, problem", [("http://", "no host"), ("https:///datasets", "no host"),
                                               ("http://:8080", "no host"), ("huggingface.co", "not http(s)")])
def test_a_chat_stage_s_hf_endpoint_needs_a_scheme_and_a_host(kind, endpoint, problem):
    """(http:// alone passed, and failed later naming environment.HF_ENDPOINT, which the user had not set.)"""
    with pytest.raises(ConfigError) as error:
        kind(hf_endpoint=endpoint).validate()
    assert str(error.value) == (f"{kind.__name__}.hf_endpoint: must be an http(s) URL with a host "
                                f"(https://huggingface.co or a mirror's), got {endpoint!r} ({problem})")


@pytest.mark.parametrize("kind", [ChatConfig, RLConfig])
def test_a_chat_stage_s_wandb_names_are_checked_with_its_config(kind):
    with pytest.raises(ConfigError, match=rf"^{kind.__name__}\.wandb_project: 'sft%' contains %, which W&B refuses"):
        kind(wandb_project="sft%").validate()
    with pytest.raises(ConfigError, match=rf"^{kind.__name__}\.wandb_entity: 'a\\\\b' contains \\, which W&B"):
        kind(wandb_entity="a\\b").validate()


def test_a_run_that_trains_only_its_residual_scalars_still_trains():
    RunConfig(embedding_lr=0, unembedding_lr=0, matrix_lr=0, residual_scalars=True).validate()


@pytest.mark.parametrize("kind", [ChatConfig, RLConfig])
@pytest.mark.parametrize("changes, line", [
    (dict(init_lr_frac=0), "init_lr_frac: must be > 0: it scales every learning rate of the stage, so 0 would leave "
                           "the model as it starts"),
    (dict(save_to=" "), "save_to: ' ' starts or ends with white space"),
    (dict(save_to="\truns/sft"), "save_to: '\\truns/sft' starts or ends with white space"),
])
def test_a_chat_stage_that_would_train_nothing_or_save_elsewhere_is_refused(kind, changes, line):
    with pytest.raises(ConfigError) as error:
        kind(**changes).validate()
    assert str(error.value) == f"{kind.__name__}.{line}"


def test_divisibility_error_shows_the_arithmetic():
    with pytest.raises(ConfigError, match=r"16 x 512 x 1 = 8192"):
        RunConfig(total_batch_size=10000).validate()


def test_unknown_field_in_a_preset_is_named(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("depht: 4\n")
    with pytest.raises(ConfigError, match="RunConfig.depht: unknown field"):
        RunConfig.from_file(preset)


def test_json_preset_and_overrides(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{"data_url": "http://127.0.0.1:1/mirror", "depth": 4}')
    config = load_config(preset, num_iterations=7)
    assert (config.data_url, config.depth, config.num_iterations) == ("http://127.0.0.1:1/mirror", 4, 7)


def test_cli_merges_a_preset_with_overrides(capsys):
    config_main([str(CONFIGS / "smoke.yaml"), "data_url=http://127.0.0.1:8000/shards", "depth=3", "compile=true"])
    merged = RunConfig.from_mapping(json.loads(capsys.readouterr().out))
    smoke = RunConfig.from_file(CONFIGS / "smoke.yaml")
    assert merged == dataclasses.replace(smoke, data_url="http://127.0.0.1:8000/shards", depth=3, compile=True)


def test_the_config_cli_without_a_preset_asks_for_the_preset_alone(capsys):
    with pytest.raises(SystemExit):
        config_main([])
    assert capsys.readouterr().err == ("error: the following arguments are required: preset "
                                       "(see nanochat config --help)\n")


def test_cli_names_a_bad_override():
    with pytest.raises(ConfigError, match="RunConfig.detph: unknown field"):
        config_main([str(CONFIGS / "smoke.yaml"), "detph=3"])
    with pytest.raises(ConfigError, match="RunConfig.depth: must be >= 1"):
        config_main([str(CONFIGS / "smoke.yaml"), "depth=0"])
    # the second would silently win, as a preset's repeated key cannot
    with pytest.raises(ConfigError, match=r"^RunConfig\.depth: given twice on the command line; give it once$"):
        config_main([str(CONFIGS / "smoke.yaml"), "depth=2", " depth=4"])


def test_the_config_cli_writes_a_file_and_fails_in_one_line(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-m", "nanochat_flyte", "config", "configs/chat_smoke.yaml", "--chat",
                         "max_conversations=20", "-o", str(tmp_path / "chat.json")], cwd=root, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == ""
    assert ChatConfig.from_file(tmp_path / "chat.json").max_conversations == 20
    config_main([str(root / "configs" / "rl_smoke.yaml"), "--rl", "top_k=8", "-o", str(tmp_path / "rl.json")])
    rl = RLConfig.from_file(tmp_path / "rl.json")
    assert (rl.top_k, rl.num_samples) == (8, 4)  # the override, and the preset's own value
    for arguments, line in [(["configs/smoke.yaml", "num_iteration=40"],
                             "error: RunConfig.num_iteration: unknown field; did you mean num_iterations?"),
                            (["configs/nope.yaml"], "error: RunConfig.*: no preset file 'configs/nope.yaml'"),
                            (["configs/smoke.yaml", "depth=0"], "error: RunConfig.depth: must be >= 1, got 0"),
                            (["configs/rl_smoke.yaml", "--rl", "num_samples=1"],
                             "error: RLConfig.num_samples: must be >= 2, got 1"),
                            (["configs/rl_smoke.yaml", "--rl", "examples_per_step=3"],
                             "error: RLConfig.device_batch_size: the 12 answers of a step (examples_per_step x "
                             "num_samples) are not a whole number of micro-batches of 8"),
                            (["configs/chat_smoke.yaml"], "error: RunConfig.eval_max_per_task: unknown field; "
                                                          "configs/chat_smoke.yaml is a ChatConfig preset: add --chat"),
                            (["--rl", "configs/smoke.yaml"], "error: RLConfig.depth: unknown field; configs/smoke.yaml "
                                                             "is a RunConfig preset: leave out --chat and --rl")]:
        bad = subprocess.run([sys.executable, "-m", "nanochat_flyte", "config", *arguments,
                              "-o", str(tmp_path / "x.json")],
                             cwd=root, capture_output=True, text=True, timeout=60)
        assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", line + "\n")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("kind, value, field, problem", [
    (RunConfig, "matrix_lr=.nan", "matrix_lr", "must be a finite number, got nan"),
    (RunConfig, "sample_temperature=.inf", "sample_temperature", "must be a finite number, got inf"),
    (ChatConfig, "smoltalk_epochs=.nan", "smoltalk_epochs", "must be a finite number, got nan"),
    (RLConfig, "temperature=-.inf", "temperature", "must be a finite number, got -inf"),
    (RunConfig, "seed=99999999999999999999", "seed", "must be below 2**63 in size, got 99999999999999999999"),
    (RunConfig, "num_iterations=1.0e+30", "num_iterations", "must be below 2**63 in size"),
    (ChatConfig, "eval_tasks=,,,", "eval_tasks", "no task given"),  # not valid YAML: taken as the text it is
    (ChatConfig, "humaneval=maybe", "humaneval", "unknown value 'maybe'"),
    (RunConfig, "=5", "*", "override '=5' is not of the form field=value"),
])
def test_nonsense_values_are_named_before_anything_runs(kind, value, field, problem):
    preset = {RunConfig: "smoke.yaml", ChatConfig: "chat_smoke.yaml", RLConfig: "rl_smoke.yaml"}[kind]
    flag = {RunConfig: [], ChatConfig: ["--chat"], RLConfig: ["--rl"]}[kind]
    with pytest.raises(ConfigError, match=rf"^{kind.__name__}\.{re.escape(field)}: {re.escape(problem)}"):
        config_main([str(CONFIGS / preset), *flag, value])


def test_on_and_off_are_words_not_yaml_booleans(tmp_path, capsys):
    preset = tmp_path / "chat.yaml"
    preset.write_text("humaneval: off\ncompile: true\n")
    assert ChatConfig.from_file(preset).humaneval == "off" and ChatConfig.from_file(preset).compile is True
    config_main([str(preset), "--chat", "humaneval=on", "run_name=@me"])
    written = json.loads(capsys.readouterr().out)
    assert (written["humaneval"], written["run_name"]) == ("on", "@me")


def test_numbers_and_text_are_read_as_yaml_12_and_as_written(tmp_path, capsys):
    preset = tmp_path / "run.yaml"
    preset.write_text("matrix_lr: 1e-3\nseed: 010\nbpe_train_chars: 2e9\nrun_name: 2024-06-01\neval_bundle_url:\n"
                      "total_batch_size: 65_536\n")
    config = RunConfig.from_file(preset)
    assert (config.matrix_lr, config.seed, config.bpe_train_chars, config.run_name, config.eval_bundle_url,
            config.total_batch_size) == (0.001, 10, 2_000_000_000, "2024-06-01", "", 65_536)
    # a text field takes the override as written: no date, no number, no comment cut, empty for nothing
    config_main([str(CONFIGS / "smoke.yaml"), "run_name=2024_06_01", "save_to=runs/a #b", "eval_bundle_url=",
                 "wandb_entity=123", "embedding_lr=2E-4", "seed=010"])
    written = json.loads(capsys.readouterr().out)
    assert (written["run_name"], written["save_to"], written["eval_bundle_url"], written["wandb_entity"],
            written["embedding_lr"], written["seed"]) == ("2024_06_01", "runs/a #b", "", "123", 0.0002, 10)
    with pytest.raises(ConfigError, match=r"^RunConfig\.seed: must be an int, got '1:30'"):  # not 90 (base 60)
        config_main([str(CONFIGS / "smoke.yaml"), "seed=1:30"])
    assert yaml.load("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n", YamlLoader) == {"a": {"b": 1}, "c": {"b": 2}}  # merges
    preset.write_text("depth: 4\n12: 3\n")
    with pytest.raises(ConfigError, match=r"^RunConfig\.12: unknown field; field names are text"):
        RunConfig.from_file(preset)


def test_a_yaml_11_reader_s_boolean_is_the_word_it_was_read_from_for_humaneval_only():
    # pyflyte reads a preset file with PyYAML's safe_load (YAML 1.1): `humaneval: off` arrives as False
    assert ChatConfig.from_mapping({"humaneval": False}).humaneval == "off"
    assert RLConfig.from_mapping({"humaneval": True}).humaneval == "on"
    with pytest.raises(ConfigError, match=r"^ChatConfig\.run_name: must be a str, got False"):
        ChatConfig.from_mapping({"run_name": False})


@pytest.mark.parametrize("name, text, problem", [
    ("bad.yaml", "depth: [4\n", "is not a YAML document: while parsing"),
    ("bad.json", '{"depth": 4,}', "is not a JSON document: Expecting property name"),
    ("binary.yaml", b"\xff\xfe\x00depth", "is not a YAML document: 'utf-8' codec can't decode"),
    ("twice.yaml", "depth: 2\nnum_iterations: 9\ndepth: 4\n", "is not a YAML document: key 'depth' appears twice"),
    ("twice.json", '{"depth": 2, "depth": 4}', "is not a JSON document: key 'depth' appears twice"),
])
def test_a_preset_that_is_not_yaml_or_json_is_one_line(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as error:
        RunConfig.from_file(path)
    assert str(error.value).startswith(f"RunConfig.*: {str(path)!r} {problem}") and "\n" not in str(error.value)


def test_the_config_cli_names_an_output_it_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match=rf"^RunConfig\.\*: cannot write -o '{re.escape(str(tmp_path))}': "):
        config_main([str(CONFIGS / "smoke.yaml"), "-o", str(tmp_path)])  # a directory
    config_main([str(CONFIGS / "smoke.yaml"), "-o", str(tmp_path / "new" / "run.json")])  # a new folder is made
    assert RunConfig.from_file(tmp_path / "new" / "run.json") == RunConfig.from_file(CONFIGS / "smoke.yaml")


def test_a_cli_config_value_is_inline_json_a_preset_file_or_values(tmp_path, monkeypatch):
    """What both Flyte fronts' --config takes (StrictConfig.from_cli_value), over the workflow's default input."""
    default = {"depth": 12}
    assert RunConfig.from_cli_value(' {"num_iterations": 5}', default) == RunConfig(depth=12, num_iterations=5)
    assert RunConfig.from_cli_value({"num_iterations": 5}, default) == RunConfig(depth=12, num_iterations=5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[x]").mkdir()
    (tmp_path / "[x]" / "c.yaml").write_text("num_iterations: 5\n")
    assert RunConfig.from_cli_value("[x]/c.yaml") == RunConfig(num_iterations=5)  # a file, though it starts with [
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: not valid JSON"):
        RunConfig.from_cli_value("[x]/d.yaml")
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: empty: give a preset file"):
        RunConfig.from_cli_value("  ")
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: not valid JSON: key 'depth' appears twice"):
        RunConfig.from_cli_value('{"depth": 5, "depth": 2}')
    with pytest.raises(ConfigError, match=r"^RunConfig\.bogus: unknown field"):
        RunConfig.from_cli_value({"bogus": 1}, default)
    # what `nanochat config` writes is JSON longer than a file name may be (255 bytes): never looked up as a file
    written = ChatConfig(run_name="a" * 300).to_dict()
    assert ChatConfig.from_cli_value(json.dumps(written)) == ChatConfig(run_name="a" * 300)
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: no preset file 'aaa"):
        RunConfig.from_cli_value("a" * 300)


@pytest.mark.parametrize("text", ["", "\n# nothing set\n", "null\n"])
def test_an_empty_preset_is_refused_not_read_as_the_reference_run(tmp_path, text):
    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: '.*empty.yaml' is empty: write the fields it sets"):
        RunConfig.from_cli_value(str(tmp_path / "empty.yaml"))
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert RunConfig.from_cli_value(str(tmp_path / "defaults.yaml")) == RunConfig()


def test_the_config_cli_names_another_kinds_preset_only_for_the_presets_own_fields(tmp_path):
    (tmp_path / "shared.yaml").write_text("num_iterations: 10\n")  # fields every kind has
    with pytest.raises(ConfigError, match=r"^RunConfig\.dept: unknown field; did you mean depth\?$"):
        config_main([str(tmp_path / "shared.yaml"), "dept=4"])


@pytest.mark.parametrize("kind, preset, other", [
    (RunConfig, "chat_smoke.yaml", "ChatConfig"), (ChatConfig, "smoke.yaml", "RunConfig"),
    (RLConfig, "chat_smoke.yaml", "ChatConfig"), (ChatConfig, "rl_smoke.yaml", "RLConfig"),
])
def test_every_front_names_a_preset_of_another_kind(kind, preset, other):
    """What pyflyte's, flyte's and the stage commands' --config say (StrictConfig.from_cli_value): no "did you mean"
    guessed from the wrong kind's fields."""
    with pytest.raises(ConfigError, match=rf"^{kind.__name__}\.\w+: unknown field; the fields given are {other}'s, "
                                          rf"not {kind.__name__}'s$"):
        kind.from_cli_value(str(CONFIGS / preset), kind().to_dict())  # over the workflow's default, as pyflyte gives
    with pytest.raises(ConfigError, match=r"unknown field; did you mean seed\?$"):  # a typo of its own field
        kind.from_mapping({"sed": 1})


def test_a_preset_named_from_outside_the_repository_says_where_the_presets_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an installed package, run elsewhere: the presets are the checkout's
    with pytest.raises(ConfigError, match=r"^RunConfig\.\*: no preset file 'configs/smoke\.yaml' \(the presets are "
                                          r"the repository's configs/: run from its root\)$"):
        RunConfig.from_file("configs/smoke.yaml")
