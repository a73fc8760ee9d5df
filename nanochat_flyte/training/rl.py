"""Reinforcement learning (RL) on GSM8K: a chat checkpoint learns from its own answers, rewarded for the right number.

    nanochat rl --sft-checkpoint DIR_OR_URI --out-dir DIR [--config PRESET] [field=value ...]
    torchrun --nproc_per_node=8 -m nanochat_flyte rl --sft-checkpoint ... --out-dir ...

The algorithm is nanochat's simplified GRPO, which is REINFORCE with a group baseline:
- for each problem the model samples num_samples answers (through the inference engine, calculator included);
- an answer whose first `#### N` is the reference number earns reward 1, any other 0 (GSM8K's grading, nanochat's);
- an answer's advantage is its reward minus the mean reward of its group (no division by the spread);
- the loss is minus the advantage times the log-probability of each token the model sampled, summed and divided by
  the number of such tokens (token-level normalisation). The prompt, the calculator's outputs and the padding are
  not trained.
It is on-policy (the answers come from the weights being trained), so there is no probability ratio, no clipping
and no KL penalty towards the SFT model.

It runs the training loop of pretraining and SFT (loop.Trainer) with another Phase. Its "batches" are the rollouts
above, sampled when the loop asks for the next micro-batch; every row is padded to the context, so every micro-batch
has one shape (torch.compile compiles once) and a step is examples_per_step x num_samples rows of max_seq_len tokens.
The validation metric is pass@1: greedy answers to eval_problems GSM8K test problems (higher is better). Everything
else is the same loop: fp16 + GradScaler on a T4, resuming (the problem order is seeded, every answer's sampling
seed too), the out-of-memory fallback, W&B (plus rl/reward), metrics.jsonl and the checkpoint layout; the checkpoint
is a chat checkpoint (`"phase": "chat"`, `"stage": "rl"`) that every chat tool opens.
"""

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_flyte.config import RLConfig, RunConfig
from nanochat_flyte.data.chat_data import read_jsonl
from nanochat_flyte.data.conversation import render_prompt
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.chat_eval import generate, score_gsm8k
from nanochat_flyte.inference.engine import Completion, Engine, SamplingParams
from nanochat_flyte.model.checkpoint import checkpoint_run_config, read_training_state
from nanochat_flyte.model.device import EvalBatches, Precision, rank_and_world_size
from nanochat_flyte.model.gpt import GPT
from nanochat_flyte.training.loop import SAMPLING_SECONDS, Trainer, distributed_env
from nanochat_flyte.training.resume import check_same_stream
from nanochat_flyte.training.sft import ChatPhase, chat_samples


def gsm8k_reward(item: dict, answer: str) -> float:
    """1 for an answer whose first `#### N` is the reference (chat_eval's GSM8K grading), else 0."""
    return float(score_gsm8k([answer], [item])[0] is True)


SEED_STRIDE = 1_000_003  # a prime past 8 epochs of GSM8K's answers (7,473 x 16 each): runs of neighbouring seeds
#                          sample their answers from seeds of their own
SEED_RANGE = 2**62  # within what torch.Generator.manual_seed takes


def sampling_seed(seed: int, problem: int, sample: int, num_samples: int) -> int:
    """Each answer's own seed, from the run's seed and its place in the problem stream: the same answers on a
    resume, in any batch, and on every rank count."""
    return (seed * SEED_STRIDE + problem * num_samples + sample) % SEED_RANGE


@dataclass
class Rollout:
    """One sampled answer, ready to train on."""
    tokens: list[int]  # the prompt, the answer, and the stop token if the model sampled one
    trained: list[bool]  # per token: whether the model sampled it (the answer's own tokens and its stop token)
    advantage: float


def rollout(prompt: list[int], completion: Completion, advantage: float) -> Rollout:
    forced = set(completion.forced)
    trained = [False] * len(prompt) + [index not in forced for index in range(len(completion.tokens))]
    tokens = prompt + completion.tokens
    if completion.stop_token is not None:  # stopping is a choice the reward also judges
        tokens, trained = tokens + [completion.stop_token], trained + [True]
    return Rollout(tokens, trained, advantage)


def rows_tensors(rollouts: list[Rollout], row_len: int, pad_id: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, advantages): rows of row_len - 1 positions; a target is -1 unless the model sampled it."""
    inputs = torch.full((len(rollouts), row_len - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rollouts), row_len - 1), -1, dtype=torch.long)
    for row, item in enumerate(rollouts):
        tokens = torch.tensor(item.tokens[:row_len])
        trained = torch.tensor(item.trained[1:row_len])
        inputs[row, :len(tokens) - 1] = tokens[:-1]
        targets[row, :len(tokens) - 1] = torch.where(trained, tokens[1:], -1)
    advantages = torch.tensor([item.advantage for item in rollouts], dtype=torch.float32)
    return inputs.to(device), targets.to(device), advantages.to(device)


def policy_gradient_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """-(advantage x log p) of every sampled token, over the number of sampled tokens in the micro-batch."""
    inputs, targets, advantages = batch
    nll = model(inputs, targets, loss_reduction="none")  # -log p of each target; 0 where the target is -1
    sampled = (targets != -1).sum().clamp(min=1)
    return (nll * advantages[:, None]).sum() / sampled


class Rollouts:
    """RL's data loader: micro-batches of (inputs, targets, advantages), sampled from the model when asked for.

    Rank r takes problems r, r + world_size, ... of a stream that visits every problem once per epoch, in a seeded
    order. When nothing is pending it rolls out a whole step's problems for this rank at once: all their answers
    decode together (decode_batch_size at a time), so a step costs about max_new_tokens decoding passes, not that
    many per problem. Its state is the number of problems each rank has taken, and the number of ranks: at a step
    boundary nothing is pending and the state says everything.
    """

    def __init__(self, phase: "ReinforcementLearning", batch_size: int, device: torch.device, rank: int,
                 world_size: int, state: dict | None):
        self.phase, self.batch_size, self.device = phase, batch_size, device
        self.rank, self.world_size = rank, world_size
        self.problems_taken = 0
        if state:  # saved on as many ranks, or on others: go on after the stream positions they took
            check_same_stream(state, phase.rl.seed, len(phase.problems))
            stream_taken = state["problems_taken"] * state.get("world_size", world_size)
            self.problems_taken = -(-stream_taken // world_size)  # ceil: no position taken twice
        self.problems_per_step = phase.rl.examples_per_step // world_size
        answers = self.problems_per_step * phase.rl.num_samples
        # halves on a CUDA out-of-memory error
        self.decoding = EvalBatches(min(phase.rl.decode_batch_size or answers, answers), "rollouts")
        self.pending: list[Rollout] = []
        self.rewards: list[float] = []  # of the answers sampled since step_metrics() last read them
        self.answer_lengths: list[int] = []
        self.sampling_seconds = 0.0  # spent rolling out since step_metrics() last read them

    @property
    def epoch(self) -> float:
        return self.problems_taken * self.world_size / len(self.phase.problems)

    def state_dict(self) -> dict:
        return {"problems_taken": self.problems_taken, "world_size": self.world_size, "seed": self.phase.rl.seed,
                "num_problems": len(self.phase.problems)}

    def close(self) -> None:
        self.pending = []

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        while len(self.pending) < self.batch_size:
            self.pending += self.roll_out(self.problems_per_step)
        rows, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        phase = self.phase
        return rows_tensors(rows, phase.config.max_seq_len + 1, phase.tokenizer.eot_token, self.device)

    def next_problems(self, num_problems: int) -> list[tuple[dict, list[int], int]]:
        """This rank's next num_problems problems whose prompt leaves room to answer in the context, as (item,
        prompt, place in the stream of all ranks). A problem whose prompt is too long is passed over. Every rank walks
        the same rounds of world_size positions (rank r may take the r-th of each) until each rank has its
        num_problems: it renders the other ranks' prompts too, so that their problems_taken stay equal and the count
        that rank 0 saves is every rank's."""
        phase = self.phase
        mine, filled, stalled = [], [0] * self.world_size, 0
        while min(filled) < num_problems:
            first = self.problems_taken * self.world_size
            self.problems_taken += 1
            progressed = False
            for rank in range(self.world_size):
                if filled[rank] == num_problems:
                    continue
                item = phase.problem_at(first + rank)
                prompt = render_prompt(phase.tokenizer, item["messages"])
                if len(prompt) >= phase.engine.context:
                    continue  # passed over: no room to answer
                filled[rank] += 1
                progressed = True
                if rank == self.rank:
                    mine.append((item, prompt, first + rank))
            stalled = 0 if progressed else stalled + 1
            if stalled >= len(phase.problems):
                raise ConfigError("max_seq_len", f"no problem's prompt leaves room to answer in the model's context "
                                                 f"of {phase.engine.context} tokens", "RunConfig")
        return mine

    def roll_out(self, num_problems: int) -> list[Rollout]:
        """The answers to this rank's next num_problems problems (next_problems), rewarded, each against its own
        group's mean."""
        phase, rl = self.phase, self.phase.rl
        start = time.perf_counter()
        problems = self.next_problems(num_problems)
        requests = [(prompt, SamplingParams(max_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                            top_k=rl.top_k or None,
                                            seed=sampling_seed(rl.seed, position, sample, rl.num_samples)))
                    for _, prompt, position in problems for sample in range(rl.num_samples)]
        completions = self.decoding.map(requests, lambda batch: phase.engine.generate_batch(
            [prompt for prompt, _ in batch], [params for _, params in batch]))
        rollouts = []
        for index, (item, prompt, _) in enumerate(problems):
            group = completions[index * rl.num_samples:(index + 1) * rl.num_samples]
            rewards = [phase.reward(item, completion.text) for completion in group]
            baseline = sum(rewards) / len(rewards)
            self.rewards += rewards
            self.answer_lengths += [len(completion.tokens) for completion in group]
            rollouts += [rollout(prompt, completion, reward - baseline) for completion, reward in zip(group, rewards)]
        self.sampling_seconds += time.perf_counter() - start  # the engine has read every token back: all done
        return rollouts


class ReinforcementLearning(ChatPhase):
    """RL on GSM8K's training problems from an SFT checkpoint; validation pass@1 on GSM8K test problems."""

    stage, metric = "rl", "pass@1"
    higher_is_better = True
    muon_momentum_warmup = False  # as nanochat's RL: a model already trained, at 0.95 from its first step

    def __init__(self, config: RunConfig, rl: RLConfig, sft_dir: Path, data_dir: Path,
                 reward: Callable[[dict, str], float] = gsm8k_reward):
        super().__init__(sft_dir, data_dir, "chat_rl")
        self.config, self.rl, self.reward = config, rl, reward
        self.problems = read_jsonl(Path(data_dir) / "train.jsonl")
        self.val = read_jsonl(Path(data_dir) / "val.jsonl")
        self.epoch_order: dict[int, list[int]] = {}  # the current epoch's permutation, by its epoch
        self.engine: Engine | None = None
        self.rollouts: Rollouts | None = None
        print(f"rl data: {len(self.problems):,} training problems, {len(self.val):,} validation problems", flush=True)

    def problem_at(self, position: int) -> dict:
        """The problem at `position` of the stream: each epoch is its own seeded permutation of the problems."""
        epoch, index = divmod(position, len(self.problems))
        if epoch not in self.epoch_order:
            self.epoch_order = {epoch: random.Random(f"{self.rl.seed}/{epoch}").sample(range(len(self.problems)),
                                                                                       len(self.problems))}
        return self.problems[self.epoch_order[epoch][index]]

    def attach(self, model: GPT, precision: Precision) -> None:
        self.engine = Engine(model, self.tokenizer, precision, phase="chat")  # samples from the weights in training

    def batches(self, batch_size, device, rank, world_size, state):
        self.rollouts = Rollouts(self, batch_size, device, rank, world_size, state)
        return self.rollouts

    def loss(self, model, batch):
        return policy_gradient_loss(model, batch)

    def step_metrics(self):
        """The mean reward and answer length of the step's rollouts, over all ranks, and the seconds this rank spent
        rolling them out (SAMPLING_SECONDS: the step's tok/s and MFU are the policy gradient's)."""
        rollouts = self.rollouts
        totals = torch.tensor([sum(rollouts.rewards), len(rollouts.rewards), sum(rollouts.answer_lengths)],
                              dtype=torch.float64, device=rollouts.device)
        sampling_seconds = rollouts.sampling_seconds
        rollouts.rewards, rollouts.answer_lengths, rollouts.sampling_seconds = [], [], 0.0
        if dist.is_initialized():
            dist.all_reduce(totals)
        answers = max(totals[1].item(), 1)
        return {"rl/reward": totals[0].item() / answers, "rl/answer_tokens": totals[2].item() / answers,
                SAMPLING_SECONDS: sampling_seconds}

    def evaluate(self, model, batch_size, device, precision):
        """pass@1: the share of validation problems whose greedy answer is right. Decoded with the engine on the
        model being trained (`model` may be its compiled form, which would recompile for every new length)."""
        rank, world_size = rank_and_world_size()
        items = self.val[rank::world_size]
        replies = generate(self.engine, items, batches=EvalBatches(batch_size, "validation"),
                           max_tokens=self.rl.max_new_tokens)
        correct = torch.tensor(sum(score is True for score in score_gsm8k(replies, items)), dtype=torch.float64,
                               device=device)
        if dist.is_initialized():
            dist.all_reduce(correct)
        return correct.item() / len(self.val)

    def samples(self, model, precision):
        return chat_samples(self.engine, self.config)

    def info(self):
        return {"sft_checkpoint": str(self.start_dir), "rl_config": self.rl.to_dict(),
                "rl_data": {key: self.manifest[key] for key in ("endpoint", "seed", "max_problems", "eval_problems")},
                "training_problems": len(self.problems), "validation_problems": len(self.val)}


def rl_run_config(rl: RLConfig, sft: RunConfig) -> RunConfig:
    """The training loop's config for RL: the SFT run's model, context and learning rates (where `rl` leaves them
    at 0), the rates scaled by init_lr_frac and decaying linearly to 0 over the run (warmdown_ratio 1). A step is
    examples_per_step x num_samples rows of max_seq_len tokens. With rl.num_iterations 0, num_iterations is 1 until
    train_rl knows how many problems there are."""
    world_size = distributed_env()[2]
    device_batch_size = rl.device_batch_size or sft.device_batch_size
    answers = rl.examples_per_step * rl.num_samples
    if rl.examples_per_step % world_size:
        raise ConfigError("examples_per_step", f"{rl.examples_per_step} problems per step do not split evenly over "
                                               f"{world_size} ranks", "RLConfig")
    rl.check_micro_batches(device_batch_size, world_size)
    return rl.loop_config(sft, "rl", device_batch_size=device_batch_size, total_batch_size=answers * sft.max_seq_len,
                          warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)


def check_sft_checkpoint(checkpoint: str | Path) -> None:
    """Fail in one line unless `checkpoint` (a directory or URI) is a chat checkpoint: RL needs the chat format."""
    state = read_training_state(checkpoint, "sft_checkpoint", "chat_rl")
    if state.get("phase") != "chat":
        raise ConfigError("sft_checkpoint", f"{checkpoint} is a {state.get('phase')} checkpoint; RL starts from a "
                                            "chat (SFT) checkpoint, which knows the chat format", "chat_rl")


def train_rl(rl: RLConfig, sft_dir: Path, data_dir: Path, out_dir: Path, *, resume_dir: Path | None = None,
             on_save=None, env_report: dict | None = None,
             reward: Callable[[dict, str], float] = gsm8k_reward) -> dict:
    """RL of the chat checkpoint in sft_dir on the problems in data_dir (chat_data.prepare_rl_data); write the RL
    checkpoint directory to out_dir; return the summary."""
    rl.validate()
    check_sft_checkpoint(sft_dir)
    config = rl_run_config(rl, checkpoint_run_config(sft_dir))
    phase = ReinforcementLearning(config, rl, sft_dir, data_dir, reward)
    if not rl.num_iterations:  # one epoch of the problems
        steps = len(phase.problems) // rl.examples_per_step
        if steps == 0:
            raise ConfigError("max_problems", f"{len(phase.problems)} problems do not fill one step of "
                                              f"examples_per_step {rl.examples_per_step}", "RLConfig")
        config = dataclasses.replace(config, num_iterations=steps)
        print(f"rl: one epoch of {len(phase.problems):,} problems is {steps} steps of {rl.examples_per_step} "
              f"problems x {rl.num_samples} answers", flush=True)
    return Trainer(config, phase, out_dir, resume_dir=resume_dir, on_save=on_save, env_report=env_report).run()
