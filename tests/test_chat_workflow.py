"""The chat workflows run in-process by flytekit: shards and the hub's datasets served from 127.0.0.1."""

import json
import shutil
from pathlib import Path

import pytest
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data.chat_data import MAX_MIXTURE
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation import chat_eval
from nanochat_flyte.pipeline import setup
from tests.hub_server import split_path
from tests.shard_server import serve_shards, write_fineweb_shards
from tests.test_workflow import VAL_SHARD, tiny_config
from workflows.chat import (
    aggregate_chat_results,
    aggregate_rl_results,
    chat_rl,
    chat_sft,
    nanochat_chat,
    nanochat_chat_rl,
)
from workflows.nanochat import aggregate_results, describe_training_node, main
from workflows.support import TaskInputError

EVAL_TASKS = {"arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"}


def tiny_chat_config(**changes) -> ChatConfig:
    values = dict(max_conversations=120, val_conversations=10, max_seq_len=128, device_batch_size=4,
                  total_batch_size=1024, num_iterations=4, eval_every=2, sample_every=4, sample_max_tokens=4,
                  save_every=2, compile=False, wandb_mode="offline", eval_max_per_task=3, eval_max_tokens=16,
                  eval_batch_size=4)
    values.update(changes)
    return ChatConfig(**values)


def tiny_rl_config(**changes) -> RLConfig:
    values = dict(max_problems=8, eval_problems=4, examples_per_step=2, num_samples=2, max_new_tokens=8,
                  device_batch_size=4, num_iterations=2, eval_every=2, sample_every=2, sample_max_tokens=4,
                  save_every=2, compile=False, wandb_mode="offline", eval_tasks="gsm8k", eval_max_per_task=3,
                  eval_max_tokens=16, eval_batch_size=4)
    values.update(changes)
    return RLConfig(**values)


@pytest.fixture
def served_shards(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        yield server


def check_chat_pipeline_outputs(results: dict, chat_results: dict, chat_checkpoint_dir: Path, chat_report_dir: Path
                                ) -> None:
    """What nanochat_chat returns for tiny configs, under either Flyte front."""
    assert results["training"]["status"] == "completed" and results["core"] is None  # no bundle: CORE off
    assert chat_results["workflow"] == "chat_sft"  # the stage's own workflow, whichever pipeline ran it
    sft = chat_results["sft"]
    assert sft["phase"] == "chat" and sft["steps_completed"] == 4 and sft["run_name"] == "e2e_sft"
    evaluation = chat_results["chat_eval"]
    assert set(evaluation["tasks"]) | set(evaluation["skipped"]) == EVAL_TASKS
    assert all(task["examples"] == 3 for task in evaluation["tasks"].values())
    assert chat_results["chatcore"] == evaluation["chatcore"]
    assert json.loads((chat_checkpoint_dir / "training_state.json").read_text())["phase"] == "chat"
    card = (chat_report_dir / "report.md").read_text()
    assert "## Chat evaluation" in card and "| arc_easy |" in card and "validation loss" in card


def test_the_whole_pipeline_base_to_chat_eval(served_shards, hub_server):
    results, checkpoint, report, chat_results, chat_checkpoint, chat_report = nanochat_chat(
        config=tiny_config(served_shards.url), chat_config=tiny_chat_config())
    check_chat_pipeline_outputs(results, chat_results, Path(chat_checkpoint.path), Path(chat_report.path))


def test_the_whole_pipeline_with_rl_goes_on_from_a_base_checkpoint_to_the_rl_model(served_shards, hub_server, capfd):
    """Pretraining continues the 2-step run given as resume_from (as a stopped pipeline is relaunched), to 4 steps;
    SFT starts from that model, and RL from the SFT one."""
    _, stopped, _ = main(config=tiny_config(served_shards.url, num_iterations=2, eval_every=2, sample_every=2,
                                            save_every=2))
    outputs = nanochat_chat_rl(**rl_pipeline_inputs(served_shards.url), resume_from=stopped.path)
    assert f"resuming from {stopped.path}" in capfd.readouterr().out
    steps = [row["step"] for row in map(json.loads, (Path(outputs.checkpoint.path) / "metrics.jsonl").open())
             if "train/loss" in row]
    assert steps == [1, 2, 3, 4]  # 1-2 from the stopped run, none twice
    check_rl_pipeline_outputs(*outputs)


def rl_pipeline_inputs(shards_url: str) -> dict:
    """nanochat_chat_rl's inputs for a tiny run: 4 pretraining steps, 2 of SFT, 2 of RL, evaluated on GSM8K."""
    return dict(config=tiny_config(shards_url, num_iterations=4, eval_every=4, sample_every=4, save_every=4),
                chat_config=tiny_chat_config(num_iterations=2, eval_tasks="gsm8k"), rl_config=tiny_rl_config())


def check_rl_pipeline_outputs(results: dict, checkpoint, report, chat_results: dict, chat_checkpoint, chat_report,
                              rl_results: dict, rl_checkpoint, rl_report) -> None:
    """What nanochat_chat_rl returns for rl_pipeline_inputs, under either Flyte front (whose directories both have
    a .path)."""
    assert results["training"]["steps_completed"] == 4
    assert chat_results["sft"]["steps_completed"] == 2
    rl = rl_results["rl"]
    assert (rl["stage"], rl["steps_completed"], rl["run_name"]) == ("rl", 2, "e2e_sft_rl")
    assert rl_results["sft_checkpoint"] == chat_checkpoint.path
    assert set(rl_results["chat_eval"]["tasks"]) == {"gsm8k"}
    state = json.loads((Path(rl_checkpoint.path) / "training_state.json").read_text())
    assert (state["phase"], state["stage"]) == ("chat", "rl")
    assert "max validation pass@1" in (Path(rl_report.path) / "report.md").read_text()


@pytest.mark.parametrize("run, field", [
    (lambda url: nanochat_chat(config=tiny_config(url), chat_config=tiny_chat_config(num_iterations=-1)),
     "ChatConfig.num_iterations"),
    (lambda url: nanochat_chat(config=tiny_config(url), chat_config=tiny_chat_config(total_batch_size=1000)),
     "ChatConfig.total_batch_size"),  # 1000 tokens are not a whole number of micro-batches of 4 rows x 128 tokens
    (lambda url: nanochat_chat_rl(config=tiny_config(url), chat_config=tiny_chat_config(),
                                  rl_config=tiny_rl_config(device_batch_size=3)), "RLConfig.device_batch_size"),
    (lambda url: nanochat_chat(config=tiny_config(url), chat_config=tiny_chat_config(hf_endpoint="http://127.0.0.1:9")),
     "ChatConfig.hf_endpoint"),  # SFT's hub, probed before pretraining, not hours later in SFT's own setup
    (lambda url: nanochat_chat_rl(config=tiny_config(url), chat_config=tiny_chat_config(),
                                  rl_config=tiny_rl_config(), resume_from="/no/such/checkpoint"),
     "nanochat_chat_rl.resume_from"),  # named as the pipeline's own input
])
def test_a_pipelines_bad_chat_or_rl_config_fails_before_any_download(served_shards, hub_server, run, field):
    # built directly, as a console relaunch builds them: pyflyte run's own check of each config is not involved
    with pytest.raises(Exception, match=rf"{field}: "):
        run(served_shards.url)
    assert served_shards.requests == []
    # probes: listings, and the SFT sources' footers (the last bytes of their files)
    assert all(request.path.startswith("/api/datasets/") for request in hub_server.requests)
    assert all("Range" in request.headers for request in hub_server.requests if request.path.endswith(".parquet")
               and request.method == "GET")


def test_humaneval_on_where_no_sandbox_works_fails_before_pretraining(monkeypatch):
    """A pipeline's checks (and each chat stage's setup) find it before the hub is probed, hours before the chat
    evaluation would."""
    monkeypatch.setattr(chat_eval, "sandbox_available", lambda: (False, "no user namespaces"))
    with pytest.raises(ConfigError, match=r"^ChatConfig\.humaneval: on, but the sandbox .*: no user namespaces"):
        setup.later_stages(RunConfig(), ChatConfig(humaneval="on"))
    with pytest.raises(ConfigError, match=r"^RLConfig\.humaneval: on"):
        setup.probe_stage(RLConfig(humaneval="on"))
    with pytest.raises(ConfigError, match=r"^RLConfig\.hf_endpoint: "):  # no HumanEval asked for: on to the hub
        setup.probe_stage(RLConfig(humaneval="on", eval_tasks="gsm8k", hf_endpoint="http://127.0.0.1:9"))
    # the inputs are checked on a CPU pod; the training node kind, where the evaluation will run, checks the sandbox
    assert setup.sandbox_required_by(RLConfig(humaneval="on")) == "RLConfig"
    assert setup.sandbox_required_by(RLConfig(humaneval="on", eval_tasks="gsm8k")) == ""
    with pytest.raises(Exception, match=r"RLConfig\.humaneval: on, but the sandbox .*: no user namespaces"):
        describe_training_node(sandbox_for="RLConfig", later_stage=True)


def test_sft_epochs_that_make_too_large_a_mixture_fail_before_pretraining(hub_server):
    """The mixture is prepared after pretraining: the checks count its sources' rows from their parquet footers."""
    smoltalk, mmlu = (hub_server.rows[key] for key in [("HuggingFaceTB/smol-smoltalk", "default", "train"),
                                                        ("cais/mmlu", "all", "auxiliary_train")])
    epochs = MAX_MIXTURE // mmlu + 1
    with pytest.raises(ConfigError, match=rf"^ChatConfig\.mmlu_epochs: {epochs} epochs make a mixture of up to "
                                          rf"{smoltalk + epochs * mmlu:,} conversations, more than the 10,000,000"):
        setup.later_stages(RunConfig(), ChatConfig(mmlu_epochs=epochs))
    assert not [request for request in hub_server.requests if request.method == "GET" and request.path.endswith(
        ".parquet") and "Range" not in request.headers]  # no file downloaded: their last bytes read
    fits = ChatConfig(mmlu_epochs=epochs - 1, smoltalk_epochs=0, gsm8k_epochs=0)
    assert setup.later_stages(RunConfig(), fits)[0] == fits
    # a count that cannot be had never stops a run: the data's preparation checks the mixture as it did before
    hub_server.supports_range = False
    assert setup.later_stages(RunConfig(), ChatConfig(mmlu_epochs=epochs))[0].mmlu_epochs == epochs
    hub_server.supports_range = True
    hub_server.fail(split_path("cais/mmlu", "all", "auxiliary_train") + "/0.parquet", "503", times=None)
    assert setup.later_stages(RunConfig(), ChatConfig(mmlu_epochs=epochs))[0].mmlu_epochs == epochs


def test_an_sft_source_whose_epochs_make_no_conversation_fails_before_pretraining(hub_server):
    """A fraction of an epoch that rounds to nothing would leave that source out, or the mixture empty, which SFT
    found out only when it started."""
    gsm8k = hub_server.rows[("openai/gsm8k", "main", "train")]
    too_few = 0.4 / gsm8k  # rounds to 0 of its rows
    with pytest.raises(ConfigError, match=rf"^ChatConfig\.gsm8k_epochs: {too_few:g} epochs of gsm8k's {gsm8k:,} "
                                          r"conversations make none; give more, or 0 to leave it out$"):
        setup.later_stages(RunConfig(), ChatConfig(gsm8k_epochs=too_few))


def test_a_pipeline_whose_stages_save_to_one_place_fails_before_pretraining(tmp_path):
    """Each stage's copies would replace the model the next one starts from."""
    base, chat = RunConfig(save_to=str(tmp_path / "base")), ChatConfig(save_to=str(tmp_path / "base") + "/")
    with pytest.raises(ConfigError, match=r"^ChatConfig\.save_to: '.*/' holds the base model \(RunConfig\.save_to\)"):
        setup.later_stages(base, chat)
    with pytest.raises(ConfigError, match=r"^RLConfig\.save_to: .* holds the chat model \(ChatConfig\.save_to\)"):
        setup.later_stages(base, ChatConfig(save_to="s3://bucket/chat"), RLConfig(save_to="s3://bucket/chat/"))
    with pytest.raises(ConfigError, match=r"^RLConfig\.save_to: .* holds the base model \(RunConfig\.save_to\)"):
        setup.later_stages(base, ChatConfig(), RLConfig(save_to=str(tmp_path / "base")))
    resumed = str(tmp_path / "old_base")  # the checkpoint pretraining continues
    with pytest.raises(ConfigError, match=r"^ChatConfig\.save_to: .* holds the pretraining's resume_from"):
        setup.later_stages(RunConfig(), ChatConfig(save_to=resumed), resume_from=resumed)
    with pytest.raises(ConfigError, match=r"^RLConfig\.save_to: .* holds the pretraining's resume_from"):
        setup.later_stages(RunConfig(), ChatConfig(), RLConfig(save_to=resumed), resume_from=resumed)


def test_chat_sft_from_a_checkpoint_directory_reuses_its_downloads(served_shards, hub_server):
    _, checkpoint, _ = main(config=tiny_config(served_shards.url, num_iterations=2, eval_every=2, sample_every=2,
                                               save_every=2))
    config = tiny_chat_config(num_iterations=2, eval_tasks="arc_easy,gsm8k")
    first, first_results, _ = chat_sft(base_checkpoint=FlyteDirectory(checkpoint.path), config=config)
    assert first_results["sft"]["steps_completed"] == 2
    assert set(first_results["chat_eval"]["tasks"]) == {"arc_easy", "gsm8k"}

    # the same run again, continuing the first (finished at step 2) to 4 steps: its data is cached
    hub_server.requests.clear()
    longer = tiny_chat_config(num_iterations=4, eval_tasks="arc_easy,gsm8k")
    resumed, resumed_results, _ = chat_sft(base_checkpoint=FlyteDirectory(checkpoint.path), config=longer,
                                           resume_from=first.path)
    assert not [r for r in hub_server.requests if r.path.endswith(".parquet")]  # cached: no dataset downloaded again
    assert resumed_results["sft"]["steps_completed"] == 4
    steps = [row["step"] for row in map(json.loads, (Path(resumed.path) / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in row]
    assert steps == [1, 2, 3, 4]  # 1 and 2 from the first run, carried over; 3 and 4 trained now

    # RL of that chat checkpoint, then its chat evaluation
    rl_checkpoint, rl_results, rl_report = chat_rl(sft_checkpoint=FlyteDirectory(first.path), config=tiny_rl_config())
    assert rl_results["workflow"] == "chat_rl" and rl_results["sft_checkpoint"] == first.path
    rl = rl_results["rl"]
    assert (rl["phase"], rl["stage"], rl["steps_completed"]) == ("chat", "rl", 2)
    assert rl["run_name"] == "e2e_sft_rl" and "max_validation_pass@1" in rl
    assert set(rl_results["chat_eval"]["tasks"]) == {"gsm8k"}
    state = json.loads((Path(rl_checkpoint.path) / "training_state.json").read_text())
    assert (state["phase"], state["stage"]) == ("chat", "rl")
    card = (Path(rl_report.path) / "report.md").read_text()
    assert "## Chat evaluation" in card and "max validation pass@1" in card

    # the 2 x 2 answers of a step are not micro-batches of 3: said by check_rl_stage, before any download or GPU node
    hub_server.requests.clear()
    with pytest.raises(Exception, match=r"RLConfig\.device_batch_size: the 4 answers of a step"):
        chat_rl(sft_checkpoint=FlyteDirectory(first.path), config=tiny_rl_config(device_batch_size=3))
    assert hub_server.requests == []


def test_a_stage_from_the_wrong_checkpoint_a_bad_batch_or_onto_its_start_fails_before_any_download(
        served_shards, hub_server, tmp_path):
    _, checkpoint, _ = main(config=tiny_config(served_shards.url, num_iterations=1, eval_every=1, sample_every=1,
                                               save_every=1))
    with pytest.raises(Exception, match=r"chat_rl\.sft_checkpoint: .* is a base checkpoint; RL starts from a chat"):
        chat_rl(sft_checkpoint=FlyteDirectory(checkpoint.path), config=tiny_rl_config())
    with pytest.raises(Exception, match=r"ChatConfig\.total_batch_size: 1000 is not divisible"):
        chat_sft(base_checkpoint=FlyteDirectory(checkpoint.path), config=tiny_chat_config(total_batch_size=1000))
    with pytest.raises(Exception, match=r"ChatConfig\.save_to: '.*' holds the base_checkpoint: this run's copies "
                                        "would replace it; choose another save_to"):
        chat_sft(base_checkpoint=FlyteDirectory(checkpoint.path), config=tiny_chat_config(save_to=checkpoint.path))
    chat = shutil.copytree(checkpoint.path, tmp_path / "chat")  # a chat checkpoint, as SFT leaves one
    state = json.loads((chat / "training_state.json").read_text())
    (chat / "training_state.json").write_text(json.dumps({**state, "phase": "chat"}))
    with pytest.raises(Exception, match=r"chat_sft\.base_checkpoint: .* is a chat checkpoint; SFT starts from a base"):
        chat_sft(base_checkpoint=FlyteDirectory(str(chat)), config=tiny_chat_config())
    with pytest.raises(Exception, match=r"chat_sft\.resume_from: .* is a checkpoint of the base stage; this chat run "
                                        r"continues only its own stage's checkpoints"):
        chat_sft(base_checkpoint=FlyteDirectory(checkpoint.path), config=tiny_chat_config(),
                 resume_from=checkpoint.path)
    with pytest.raises(Exception, match=r"chat_rl\.resume_from: .*nowhere is not a checkpoint directory"):
        chat_rl(sft_checkpoint=FlyteDirectory(str(chat)), config=tiny_rl_config(),
                resume_from=str(tmp_path / "nowhere"))
    assert hub_server.requests == []


def test_a_base_checkpoint_that_is_not_one_fails_before_any_gpu_time(tmp_path, hub_server):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"chat_sft\.base_checkpoint: .* is not a checkpoint directory"):
        chat_sft(base_checkpoint=FlyteDirectory(str(tmp_path / "empty")), config=tiny_chat_config())
    assert hub_server.requests == []


@pytest.mark.parametrize("results_task", [aggregate_results, aggregate_chat_results, aggregate_rl_results])
def test_a_user_error_writing_the_results_is_one_line(results_task, tmp_path):
    """The last task of every pipeline fails in one line on a user's mistake, as every task before it: here a
    save_to whose scheme no fsspec package knows (a chat stage's checkpoint, deleted, fails first)."""
    gone = FlyteDirectory(str(tmp_path / "deleted_checkpoint"))
    if results_task is aggregate_results:
        inputs = dict(config=RunConfig(save_to="nosuchscheme://bucket/run"), manifest={}, core={},
                      training={"final_validation_bpb": 2.0}, checkpoint=gone)
        line = "nosuchscheme://bucket/run: Protocol not known"
    else:
        config = ChatConfig() if results_task is aggregate_chat_results else RLConfig()
        start = "base_checkpoint" if results_task is aggregate_chat_results else "sft_checkpoint"
        inputs = {"config": config, start: gone, "training": {}, "evaluation": {}, "checkpoint": gone}
        line = "deleted_checkpoint"
    with pytest.raises(TaskInputError, match=line) as failure:
        results_task.task_function(environment={}, **inputs)
    assert "\n" not in str(failure.value)
