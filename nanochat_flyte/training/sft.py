"""Supervised fine-tuning (SFT): a base checkpoint becomes a chat checkpoint, trained on conversations.

    nanochat sft --base-checkpoint DIR_OR_URI --out-dir DIR [--config PRESET] [field=value ...]
    torchrun --nproc_per_node=8 -m nanochat_flyte sft --base-checkpoint ... --out-dir ...

It runs the training loop of pretraining (loop.Trainer) with another Phase: batches of conversations packed into
rows (packing.py) where only the assistant's tokens are trained on, the validation loss on held-out assistant
tokens (SmolTalk's test split), and chat samples. Everything else is the same loop: precision by device (fp16 +
GradScaler on a T4), resuming, the out-of-memory fallback, W&B, metrics.jsonl and the checkpoint layout; the
checkpoint says `"phase": "chat"`.

The settings follow nanochat's SFT (ChatConfig): the base run's context, batch and learning rates, the rates
scaled by init_lr_frac, a linear warmdown over the last half, and one epoch of the mixture unless num_iterations
says otherwise. The CLI reads the datasets from $HF_ENDPOINT (default: the Hugging Face hub); the workflow
prepares them in a CPU task first (chat_data.prepare_sft_data).
"""

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_flyte.config import ChatConfig, RunConfig
from nanochat_flyte.data.chat_data import prepared_manifest, read_jsonl
from nanochat_flyte.data.conversation import ChatTokens
from nanochat_flyte.data.packing import (
    ConversationLoader,
    RenderedConversations,
    epoch_rows,
    rows_tensor,
    steps_per_epoch,
)
from nanochat_flyte.data.tokenizer import load_tokenizer
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.model.checkpoint import (
    TOKENIZER_DIR,
    checkpoint_run_config,
    load_checkpoint,
    read_training_state,
)
from nanochat_flyte.model.device import rank_and_world_size
from nanochat_flyte.training.loop import Phase, Trainer, distributed_env, load_optimizer_states

CHAT_SAMPLE_PROMPTS = (
    "Hello! Who are you?",
    "What is the capital of France?",
    "Why is the sky blue?",
    "If 5*x + 3 = 13, what is x?",
)


class ChatPhase(Phase):
    """A phase that starts from a checkpoint's weights and tokenizer and trains in the chat format, on data prepared
    for it (chat_data): SFT from a base checkpoint, RL from a chat one."""

    model_kind = "chat"
    load_optimizer = False  # the start checkpoint's optimizer states too (SFT, as nanochat's)

    def __init__(self, start_dir: Path, data_dir: Path, data_kind: str):
        self.start_dir = Path(start_dir)
        self.tokenizer_dir = self.start_dir / TOKENIZER_DIR
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        ChatTokens.of(self.tokenizer)  # a tokenizer without chat tokens fails here, before any data is read
        self.manifest = prepared_manifest(data_dir, data_kind)

    def load_start(self, model, optimizers):
        start = load_checkpoint(self.start_dir)  # read once: the weights, and the optimizer states beside them
        model.load_state_dict(start["model"])
        if self.load_optimizer:
            load_optimizer_states(optimizers, start["optimizers"])


class FineTuning(ChatPhase):
    """Next-token prediction on the assistant's turns of the SFT mixture; validation loss on held-out ones."""

    stage, metric = "chat", "loss"

    def __init__(self, config: RunConfig, chat_config: ChatConfig, base_dir: Path, data_dir: Path):
        super().__init__(base_dir, data_dir, "chat_sft")
        self.config, self.chat_config = config, chat_config
        self.load_optimizer = chat_config.load_optimizer
        row = config.max_seq_len + 1
        start = time.time()
        self.train = RenderedConversations(self.tokenizer, read_jsonl(Path(data_dir) / "train.jsonl"), row)
        self.val = RenderedConversations(self.tokenizer, read_jsonl(Path(data_dir) / "val.jsonl"), row)
        self.val_rows = epoch_rows(self.val, config.max_seq_len)
        print(f"sft data: {len(self.train):,} train conversations ({self.train.trained_tokens:,} trained tokens, "
              f"{self.train.dropped} without an assistant token in the first {row} tokens, dropped), "
              f"{len(self.val):,} validation conversations in {len(self.val_rows)} rows; rendered in "
              f"{time.time() - start:.1f}s", flush=True)

    def batches(self, batch_size, device, rank, world_size, state):
        loader = ConversationLoader(self.train, batch_size, self.config.max_seq_len, seed=self.config.seed,
                                    device=device, rank=rank, world_size=world_size)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    @torch.no_grad()
    def evaluate(self, model, batch_size, device, precision):
        """Mean cross-entropy (nats) of the held-out assistant tokens. Under DDP the ranks share the rows."""
        rank, world_size = rank_and_world_size()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, number of tokens]
        was_training = model.training
        model.eval()
        try:
            for first in range(rank * batch_size, len(self.val_rows), world_size * batch_size):
                inputs, targets = rows_tensor(self.val, self.val_rows[first:first + batch_size],
                                              self.config.max_seq_len + 1)
                inputs, targets = inputs.to(device), targets.to(device)
                with precision.autocast():
                    losses = model(inputs, targets, loss_reduction="none")
                trained = targets != -1
                total += torch.stack([losses[trained].sum().double(), trained.sum().double()])
        finally:
            model.train(was_training)
        if dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def samples(self, model, precision):
        return chat_samples(Engine(model, self.tokenizer, precision, phase="chat"), self.config)

    def info(self):
        return {"base_checkpoint": str(self.start_dir), "chat_config": self.chat_config.to_dict(),
                "sft_data": {key: value for key, value in self.manifest.items() if key != "sources"},
                "train_conversations": len(self.train), "trained_tokens": self.train.trained_tokens}


def chat_samples(engine: Engine, config: RunConfig) -> list[dict[str, str]]:
    """Greedy replies of a chat model to CHAT_SAMPLE_PROMPTS (what SFT and RL log as samples). A prompt that leaves
    no room for a reply in the model's context is skipped: samples must never end a run before its final save."""
    # Not cropped as pretraining's text prompts are: a chat prompt without its start is no conversation
    prompts = {text: engine.chat_prompt([{"role": "user", "content": text}]) for text in CHAT_SAMPLE_PROMPTS}
    prompts = {text: prompt for text, prompt in prompts.items() if len(prompt) < engine.context}
    params = SamplingParams(max_tokens=config.sample_max_tokens, seed=config.seed)
    return [{"prompt": text, "completion": completion.text}
            for text, completion in zip(prompts, engine.generate_batch(list(prompts.values()), params))]


def sft_run_config(chat: ChatConfig, base: RunConfig) -> RunConfig:
    """The training loop's config for SFT: the base run's context, batch and learning rates where `chat` leaves
    them at 0, the rates scaled by init_lr_frac. With chat.num_iterations 0, num_iterations is 1 until train_chat
    knows how many steps one epoch of the rendered conversations takes."""
    batch = {field: getattr(chat, field) or getattr(base, field)
             for field in ("max_seq_len", "device_batch_size", "total_batch_size")}
    config = chat.loop_config(base, "sft", **batch, warmup_ratio=chat.warmup_ratio,
                              warmdown_ratio=chat.warmdown_ratio, final_lr_frac=chat.final_lr_frac,
                              eval_tokens=max(base.eval_tokens, batch["max_seq_len"] + 1))
    try:
        config.grad_accum_steps(distributed_env()[2])
    except ConfigError as error:  # name the ChatConfig field the user can change
        raise ConfigError("total_batch_size", str(error).split(": ", 1)[1], "ChatConfig") from None
    return config


def check_base_checkpoint(checkpoint: str | Path) -> None:
    """Fail in one line unless `checkpoint` (a directory or URI) is a base (pretrained) checkpoint: SFT teaches a
    base model the chat format, as nanochat's chat_sft starts from its base (or mid-trained) model."""
    state = read_training_state(checkpoint, "base_checkpoint", "chat_sft")
    if state.get("phase", "base") != "base":
        raise ConfigError("base_checkpoint", f"{checkpoint} is a {state['phase']} checkpoint; SFT starts from a base "
                                             "(pretrained) checkpoint: give the one it was fine-tuned from",
                          "chat_sft")


def train_chat(chat: ChatConfig, base_dir: Path, data_dir: Path, out_dir: Path, *, resume_dir: Path | None = None,
               on_save=None, env_report: dict | None = None) -> dict:
    """Fine-tune the base checkpoint in base_dir on the SFT data in data_dir (chat_data.prepare_sft_data); write
    the chat checkpoint directory to out_dir; return the summary."""
    chat.validate()
    check_base_checkpoint(base_dir)
    config = sft_run_config(chat, checkpoint_run_config(base_dir))
    phase = FineTuning(config, chat, base_dir, data_dir)
    if not chat.num_iterations:  # one epoch of the mixture, rows_per_step rows of max_seq_len tokens a step
        rows_per_step = config.total_batch_size // config.max_seq_len
        config = dataclasses.replace(config, num_iterations=steps_per_epoch(phase.train, config.max_seq_len,
                                                                             config.seed, rows_per_step))
        print(f"sft: one epoch of the mixture is {config.num_iterations} steps of {config.total_batch_size:,} "
              f"tokens", flush=True)
    return Trainer(config, phase, out_dir, resume_dir=resume_dir, on_save=on_save, env_report=env_report).run()
