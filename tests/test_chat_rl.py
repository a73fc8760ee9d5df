"""RL on GSM8K: the policy-gradient loss and the rollout rows by hand, the config, and runs of the real loop on a
tiny chat checkpoint: it trains, learns what its reward asks for, resumes exactly, and refuses bad input early."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_bench, make_data_dir, tiny_config
from hub_server import GSM8K

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data.chat_data import gsm8k_conversation, gsm8k_item, prepare_rl_data
from nanochat_flyte.data.tokenizer import gpt2_tokenizer
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.inference.engine import Completion, Engine
from nanochat_flyte.model.checkpoint import load_checkpoint
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.training.pretrain import train
from nanochat_flyte.training.rl import (
    Rollout,
    Rollouts,
    gsm8k_reward,
    policy_gradient_loss,
    rl_run_config,
    rollout,
    rows_tensors,
    sampling_seed,
    train_rl,
)
from nanochat_flyte.training.sft import train_chat

ROOT = Path(__file__).resolve().parents[1]


def rl_config(**changes) -> RLConfig:
    """4 problems x 4 answers of at most 12 tokens a step, micro-batches of 4 rows of 96 tokens."""
    values = dict(examples_per_step=4, num_samples=4, max_new_tokens=12, device_batch_size=4, num_iterations=4,
                  eval_problems=6, eval_every=2, sample_every=4, sample_max_tokens=6, save_every=2, device="cpu",
                  dtype="float32", compile=False, wandb_mode="disabled")
    values.update(changes)
    return RLConfig(**values)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base")
    train(tiny_config(num_iterations=10, eval_every=10, sample_every=10, save_every=10),
          make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=20_000), base)
    return base


@pytest.fixture(scope="module")
def sft_checkpoint(base_checkpoint, tmp_path_factory) -> Path:
    """The tiny base model fine-tuned for a few steps on GSM8K-style conversations (the test hub's problems)."""
    data = tmp_path_factory.mktemp("sft_data")
    conversations = [gsm8k_conversation(row, index) for index, row in enumerate(GSM8K)]
    write_jsonl(data / "train.jsonl", conversations[:40])
    write_jsonl(data / "val.jsonl", conversations[40:])
    (data / "manifest.json").write_text(json.dumps({"endpoint": "test", "seed": 42, "train_conversations": 40,
                                                    "val_conversations": len(conversations) - 40}))
    chat = ChatConfig(max_seq_len=96, device_batch_size=4, total_batch_size=768, num_iterations=6, eval_every=6,
                      sample_every=6, sample_max_tokens=4, save_every=6, device="cpu", dtype="float32",
                      compile=False, wandb_mode="disabled")
    out = tmp_path_factory.mktemp("sft")
    train_chat(chat, base_checkpoint, data, out)
    return out


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    """RL's data directory as prepare_rl_data writes it, from the test hub's GSM8K rows."""
    data = tmp_path_factory.mktemp("rl_data")
    write_jsonl(data / "train.jsonl", [gsm8k_item(row, index, "gsm8k_train") for index, row in enumerate(GSM8K[:30])])
    write_jsonl(data / "val.jsonl", [gsm8k_item(row, index) for index, row in enumerate(GSM8K[30:36])])
    (data / "manifest.json").write_text(json.dumps({"endpoint": "test", "seed": 42, "max_problems": 0,
                                                    "eval_problems": 6}))
    return data


def metric_rows(checkpoint: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]

# ---------------------------------------------------------------------------- the pieces, by hand


def test_the_reward_is_one_for_the_right_final_number_only():
    item = {"messages": [], "answer": "1200"}
    assert gsm8k_reward(item, "48 * 25 = <<48*25=1200>>1200 clips.\n#### 1,200") == 1.0
    assert gsm8k_reward(item, "#### 1200.") == 0.0  # as GSM8K's grader and nanochat's reward read it
    assert gsm8k_reward(item, "#### 120") == 0.0
    assert gsm8k_reward(item, "The answer is 1200") == 0.0  # no `####`: GSM8K's grading, as chat_eval's


def test_a_rollout_trains_the_sampled_tokens_and_the_stop_token_only():
    prompt = [5, 6, 7]
    completion = Completion(tokens=[10, 11, 12, 13, 14], text="", finish_reason="stop", forced=[2, 3], stop_token=99)
    row = rollout(prompt, completion, advantage=0.25)
    assert row.tokens == [5, 6, 7, 10, 11, 12, 13, 14, 99]
    assert row.trained == [False, False, False, True, True, False, False, True, True]
    inputs, targets, advantages = rows_tensors([row, Rollout([5, 6], [False, True], -0.5)], row_len=11, pad_id=0,
                                               device=torch.device("cpu"))
    assert inputs.tolist() == [[5, 6, 7, 10, 11, 12, 13, 14, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    # the target at position t is token t + 1: prompt, calculator output and padding are -1
    assert targets.tolist() == [[-1, -1, 10, 11, -1, -1, 14, 99, -1, -1], [6] + [-1] * 9]
    assert advantages.tolist() == [0.25, -0.5]


def test_the_policy_gradient_loss_is_minus_advantage_times_log_probability_per_sampled_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    inputs = torch.randint(0, 32, (2, 8))
    targets = torch.randint(0, 32, (2, 8))
    targets[0, :3] = -1
    targets[1, 5:] = -1
    advantages = torch.tensor([0.75, -0.25])
    log_probs = torch.log_softmax(model(inputs).float(), dim=-1)
    expected = 0.0
    for row in range(2):
        for t in range(8):
            if targets[row, t] >= 0:
                expected -= advantages[row].item() * log_probs[row, t, targets[row, t]].item()
    expected /= (targets >= 0).sum().item()
    loss = policy_gradient_loss(model, (inputs, targets, advantages))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a gradient step makes the better answer more likely and the worse one less
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= 0.5 * parameter.grad
    after = torch.log_softmax(model(inputs).float(), dim=-1)

    def answer_log_prob(probs, row):
        return sum(probs[row, t, targets[row, t]].item() for t in range(8) if targets[row, t] >= 0)

    assert answer_log_prob(after, 0) > answer_log_prob(log_probs, 0)
    assert answer_log_prob(after, 1) < answer_log_prob(log_probs, 1)


def test_each_answer_has_its_own_seed():
    seeds = {sampling_seed(42, problem, sample, 16) for problem in range(100) for sample in range(16)}
    assert len(seeds) == 1600 and sampling_seed(42, 3, 1, 16) == sampling_seed(42, 3, 1, 16)
    assert sampling_seed(43, 0, 0, 16) not in seeds


def test_rl_inherits_the_sft_run_and_names_the_field_of_a_bad_batch():
    sft = RunConfig(run_name="d8_sft", matrix_lr=0.016, embedding_lr=0.16, unembedding_lr=0.0032, scalar_lr=0.4,
                    residual_scalars=True)
    config = rl_run_config(RLConfig(init_lr_frac=0.5), sft)
    assert config.run_name == "d8_sft_rl" and config.residual_scalars
    assert (config.matrix_lr, config.embedding_lr, config.unembedding_lr, config.scalar_lr) == (0.008, 0.08, 0.0016,
                                                                                               0.2)
    # 16 problems x 16 answers of max_seq_len tokens; the rate decays linearly to 0 over the whole run
    assert config.total_batch_size == 256 * 512 and config.device_batch_size == 16
    assert (config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac) == (0.0, 1.0, 0.0)
    assert not config.evaluate_core
    with pytest.raises(ConfigError, match=r"^RLConfig\.device_batch_size: the 12 answers of a step"):
        rl_run_config(RLConfig(examples_per_step=3, num_samples=4, device_batch_size=8), sft)


@pytest.mark.parametrize("changes, message", [
    (dict(num_samples=1), r"^RLConfig\.num_samples: must be >= 2"),
    (dict(temperature=0.0), r"^RLConfig\.temperature: must be > 0"),
    (dict(max_problems=8), r"^RLConfig\.max_problems: 8 problems do not fill one step"),
    (dict(eval_tasks="gsm8k,chess"), r"^RLConfig\.eval_tasks: unknown task 'chess'"),
    (dict(hf_endpoint="huggingface.co"), r"^RLConfig\.hf_endpoint: must be an http\(s\) URL"),
])
def test_bad_rl_configs_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        RLConfig(**changes).validate()

# ---------------------------------------------------------------------------- the loop


def test_rl_trains_a_chat_checkpoint_and_logs_its_rewards(sft_checkpoint, rl_data, tmp_path, monkeypatch):
    right_answers = iter([2, 4, 1])  # of the 6 validation problems, at the evaluations of steps 0, 2 and 4

    def generate_some_right(engine, items, **kwargs):
        """Validation's greedy replies, the first few right and the rest a digit off (the tiny model's own are never
        right: pass@1 would be 0 however it were counted)."""
        right = next(right_answers)
        return [f"#### {item['answer']}" if index < right else f"#### {item['answer']}1"
                for index, item in enumerate(items)]

    monkeypatch.setattr("nanochat_flyte.training.rl.generate", generate_some_right)  # validation's replies only
    summary = train_rl(rl_config(), sft_checkpoint, rl_data, tmp_path / "rl")
    assert (summary["phase"], summary["stage"], summary["status"], summary["steps_completed"]) == (
        "chat", "rl", "completed", 4)
    assert metric_rows(tmp_path / "rl", "val/pass@1") == [2 / 6, 4 / 6, 1 / 6]
    assert (summary["max_validation_pass@1"], summary["final_validation_pass@1"]) == (4 / 6, 1 / 6)
    rewards = metric_rows(tmp_path / "rl", "rl/reward")
    lengths = metric_rows(tmp_path / "rl", "rl/answer_tokens")
    assert len(rewards) == len(lengths) == 4 and all(0 < length <= 12 for length in lengths)
    assert summary["data_epochs"] == pytest.approx(16 / 30)  # 4 steps of 4 problems out of 30
    # tok/s is the policy gradient's: the rollouts' time is logged apart, and left out
    rows = [row for row in map(json.loads, (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines())
            if "train/dt" in row]
    step_tokens = 16 * 96  # 4 problems x 4 answers, each a row of max_seq_len tokens
    assert len(rows) == 4 and all(0 < row["train/sampling_s"] < row["train/dt"] for row in rows)
    assert [row["train/tok_per_sec"] for row in rows] == pytest.approx(
        [step_tokens / (row["train/dt"] - row["train/sampling_s"]) for row in rows])
    loop = torch.load(tmp_path / "rl" / "checkpoint.pt", weights_only=True)["loop"]
    assert loop["timed_sampling_seconds"] == pytest.approx(sum(row["train/sampling_s"] for row in rows[1:]))
    assert summary["avg_tok_per_sec"] == pytest.approx(
        loop["timed_tokens"] / (loop["timed_seconds"] - loop["timed_sampling_seconds"]))
    # the RL checkpoint is a chat checkpoint: every chat tool opens it
    engine = Engine.from_checkpoint(tmp_path / "rl", device="cpu")
    assert engine.chat_mode
    state = json.loads((tmp_path / "rl" / "training_state.json").read_text())
    assert (state["phase"], state["stage"]) == ("chat", "rl")
    # the tiny model never finds a right answer: every advantage is 0, and so every update (nothing to learn from)
    assert rewards == [0.0] * 4
    weights_before = load_checkpoint(sft_checkpoint)["model"]
    weights_after = load_checkpoint(tmp_path / "rl")["model"]
    assert all(torch.equal(weights_before[name], weights_after[name]) for name in weights_before)
    _, muon = load_checkpoint(tmp_path / "rl")["optimizers"]  # (AdamW, Muon)
    assert {group["momentum"] for group in muon["param_groups"]} == {0.95}  # nanochat's RL: no warm-up from 0.85


def shortness(item: dict, answer: str) -> float:
    """A reward the tiny model can earn, unlike GSM8K's: the shorter the answer, the better."""
    return -len(answer) / 50


def test_rl_learns_what_its_reward_asks_for(sft_checkpoint, rl_data, tmp_path):
    """The loop with a reward the tiny model can earn (short answers): the answers get shorter."""
    config = rl_config(num_iterations=16, eval_every=16, sample_every=16, save_every=16, matrix_lr=0.02,
                       embedding_lr=0.2, unembedding_lr=0.01, init_lr_frac=1.0)
    train_rl(config, sft_checkpoint, rl_data, tmp_path / "rl", reward=shortness)
    lengths = metric_rows(tmp_path / "rl", "rl/answer_tokens")
    first, last = sum(lengths[:4]) / 4, sum(lengths[-4:]) / 4
    assert last < first - 2, lengths


class Killed(Exception):
    pass


def kill_at_save(path):
    raise Killed


def test_an_interrupted_rl_run_resumes_on_the_same_answers_and_weights(sft_checkpoint, rl_data, tmp_path):
    """A 4-step run killed at its step-2 save and resumed repeats the straight run. The reward is one the tiny model
    earns (it never earns GSM8K's), so the weights move: a resume that lost them would answer differently."""
    straight = train_rl(rl_config(), sft_checkpoint, rl_data, tmp_path / "straight", reward=shortness)
    with pytest.raises(Killed):
        train_rl(rl_config(), sft_checkpoint, rl_data, tmp_path / "first", on_save=kill_at_save, reward=shortness)
    assert json.loads((tmp_path / "first" / "training_state.json").read_text())["steps_completed"] == 2
    resumed = train_rl(rl_config(), sft_checkpoint, rl_data, tmp_path / "resumed", resume_dir=tmp_path / "first",
                       reward=shortness)
    assert resumed["steps_completed"] == straight["steps_completed"] == 4
    for key in ("rl/reward", "rl/answer_tokens", "train/loss"):
        assert metric_rows(tmp_path / "resumed", key) == metric_rows(tmp_path / "straight", key), key
    sft_weights = load_checkpoint(sft_checkpoint)["model"]
    straight_weights = load_checkpoint(tmp_path / "straight")["model"]
    resumed_weights = load_checkpoint(tmp_path / "resumed")["model"]
    assert any(not torch.equal(weight, sft_weights[name]) for name, weight in straight_weights.items())
    for name, weight in straight_weights.items():
        assert torch.equal(weight, resumed_weights[name]), name


@pytest.mark.parametrize("saved, world_size, taken", [({"problems_taken": 6, "world_size": 2}, 1, 12),
                                                       ({"problems_taken": 6, "world_size": 1}, 2, 3),
                                                       ({"problems_taken": 5, "world_size": 2}, 4, 3),
                                                       ({"problems_taken": 6}, 2, 6)])  # saved before world_size
def test_rl_goes_on_after_the_problems_taken_on_another_number_of_ranks(saved, world_size, taken):
    """Rank r takes stream positions taken x world_size + r: after a resume, none that the saved run's ranks took."""
    phase = SimpleNamespace(rl=rl_config(examples_per_step=4), problems=[{}] * 30)
    rollouts = Rollouts(phase, 4, torch.device("cpu"), 0, world_size, saved)
    assert rollouts.problems_taken == taken
    assert taken * world_size >= saved["problems_taken"] * saved.get("world_size", world_size)
    assert rollouts.state_dict() == {"problems_taken": taken, "world_size": world_size, "seed": 42,
                                     "num_problems": 30}


def test_ranks_that_pass_over_long_prompts_keep_taking_problems_in_step():
    """Rank 1's first problem does not fit the context and rank 0's do: both still count the same problems taken,
    so the count rank 0 saves resumes every rank after the positions it took, none twice and none skipped."""
    questions = ["What is 1 + 1?", "word " * 80, "What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?",
                 "What is 5 + 5?", "What is 6 + 6?", "What is 7 + 7?"]
    items = [{"messages": [{"role": "user", "content": question}]} for question in questions]
    phase = SimpleNamespace(rl=rl_config(examples_per_step=4), problems=items, tokenizer=gpt2_tokenizer(),
                            engine=SimpleNamespace(context=40), problem_at=lambda position: items[position % 8])
    ranks = [Rollouts(phase, 4, torch.device("cpu"), rank, 2, None) for rank in (0, 1)]
    taken = [[position for _, _, position in rollouts.next_problems(2)] for rollouts in ranks]
    assert taken == [[0, 2], [3, 5]]  # position 1, rank 1's first, is too long: rank 1 takes a third round
    assert [rollouts.problems_taken for rollouts in ranks] == [3, 3]
    resumed = Rollouts(phase, 4, torch.device("cpu"), 1, 2, ranks[0].state_dict())
    assert [position for _, _, position in resumed.next_problems(1)] == [7]  # after every position taken, rank 1's
    phase.engine.context = 5  # no prompt fits
    with pytest.raises(ConfigError, match=r"^RunConfig\.max_seq_len: no problem's prompt leaves room to answer"):
        Rollouts(phase, 4, torch.device("cpu"), 0, 2, None).next_problems(2)


@pytest.mark.parametrize("changes, message", [
    (dict(seed=7), r"RLConfig\.seed: 7 differs from 42 in the checkpoint being resumed"),
    (dict(problems=20), r"RLConfig\.max_problems: the checkpoint being resumed took its problems from 30, this run "
                        r"has 20"),
])
def test_rl_refuses_to_resume_on_another_stream_of_problems(changes, message):
    """Saved positions name the same problems only in the same seeded order of as many problems."""
    saved = {"problems_taken": 6, "world_size": 1, "seed": 42, "num_problems": 30}
    phase = SimpleNamespace(rl=rl_config(seed=changes.get("seed", 42)), problems=[{}] * changes.get("problems", 30))
    with pytest.raises(ConfigError, match=message):
        Rollouts(phase, 4, torch.device("cpu"), 0, 1, saved)


def test_rl_data_comes_from_the_hub_and_the_cli_trains(sft_checkpoint, hub_server, tmp_path):
    manifest = prepare_rl_data(RLConfig(max_problems=20, eval_problems=5), tmp_path / "prepared")
    assert (manifest["train"]["problems"], manifest["val"]["problems"]) == (20, 5)
    items = [json.loads(line) for line in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert all(item["id"].startswith("gsm8k_train/") and item["answer"] for item in items)

    preset = tmp_path / "rl.json"
    preset.write_text(json.dumps(rl_config(num_iterations=2, eval_every=2, sample_every=2, save_every=2,
                                           max_problems=8, eval_problems=4).to_dict()))
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "rl", "--sft-checkpoint",
                             sft_checkpoint.as_uri(), "--out-dir", str(tmp_path / "rl"), "--config", str(preset),
                             "seed=7"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert (summary["stage"], summary["steps_completed"]) == ("rl", 2)


@pytest.mark.parametrize("argv, message", [
    (["num_sample=4"], "error: RLConfig.num_sample: unknown field; did you mean num_samples?"),
    (["--sft-checkpoint", "BASE"], "is a base checkpoint; RL starts from a chat (SFT) checkpoint"),
    (["--data-dir", "EMPTY"], "error: chat_rl.data_dir: EMPTY holds no prepared RL problems (without data_dir,"),
    (["--data-dir", "SFT"], "error: chat_rl.data_dir: SFT holds no prepared RL problems (without data_dir,"),
    (["--data-dir", "RL_DATA", "seed=7"], "error: RLConfig.seed: 7 differs from the 42 that the data in RL_DATA was "
                                          "prepared with: give that value, or leave out --data-dir"),
    (["--resume-dir", "SFT"], "chat_rl.resume_dir: SFT is a checkpoint of the chat stage; this rl run continues"),
    (["--resume-dir", "RL_RUN", "max_problems=100"], "error: RLConfig.max_problems: 100 differs from 0 in the "
                                                     "checkpoint being resumed"),
])
def test_the_rl_cli_refuses_bad_input_in_one_line_before_any_download(base_checkpoint, sft_checkpoint, rl_data,
                                                                       tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    paths = {"BASE": str(base_checkpoint), "SFT": str(sft_checkpoint), "EMPTY": str(tmp_path / "empty"),
             "RL_RUN": str(tmp_path / "rl_run"), "RL_DATA": str(rl_data)}
    if "RL_RUN" in argv:
        train_rl(rl_config(num_iterations=2), sft_checkpoint, rl_data, tmp_path / "rl_run")
    message = " ".join(paths.get(word, word) for word in message.split(" "))
    argv = [paths.get(arg, arg) for arg in argv]
    if "--sft-checkpoint" not in argv:
        argv = ["--sft-checkpoint", str(sft_checkpoint), *argv]
    # an endpoint that answers nothing: a download attempt would fail otherwise, in more than one line
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "rl", "--out-dir", str(tmp_path / "rl"),
                             *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "rl").exists()


def test_two_cpu_ranks_roll_out_and_learn_as_one_process(sft_checkpoint, rl_data, tmp_path):
    """2 gloo ranks take alternate problems of the same stream with the same sampling seeds: each step sees the
    answers one process sees, so the same rewards, and the same update up to float summation order."""
    config = rl_config(eval_every=4, sample_every=4, save_every=4)
    train_rl(config, sft_checkpoint, rl_data, tmp_path / "single", reward=shortness)
    (tmp_path / "rl.json").write_text(json.dumps(config.to_dict()))
    script = tmp_path / "rl_ranks.py"  # the library's API under torchrun, with the same reward
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from nanochat_flyte.training.rl import train_rl
        from nanochat_flyte.config import RLConfig
        train_rl(RLConfig.from_file({str(tmp_path / "rl.json")!r}), Path({str(sft_checkpoint)!r}),
                 Path({str(rl_data)!r}), Path({str(tmp_path / "ddp")!r}), reward=lambda item, answer: -len(answer) / 50)
    """))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("rl/reward", "rl/answer_tokens"):
        assert metric_rows(tmp_path / "ddp", key) == pytest.approx(metric_rows(tmp_path / "single", key), rel=1e-6)
    assert metric_rows(tmp_path / "ddp", "train/loss") == pytest.approx(metric_rows(tmp_path / "single", "train/loss"),
                                                                       rel=1e-4)
    assert metric_rows(tmp_path / "ddp", "val/pass@1") == metric_rows(tmp_path / "single", "val/pass@1")


def test_the_rollout_bench_decodes_the_same_answers_in_either_batching(capsys):
    results = load_bench("rl_rollout_throughput").main(["--depth", "1", "--seq-len", "128", "--problems", "2",
                                                         "--num-samples", "2", "--max-new-tokens", "4",
                                                         "--decode-batch-sizes", "2,0", "--device", "cpu"])
    assert set(results) == {2, 0} and results[2]["speedup"] == 1.0
    assert all(result["answers_per_s"] > 0 for result in results.values())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decode")]
    assert [line.split(" in ")[0].split(": ")[1] for line in lines] == ["4 answers (16 tokens)"] * 2
    assert results[2]["rollouts"] == results[0]["rollouts"]  # each answer its own seed's, in any batch
