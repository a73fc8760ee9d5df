"""Resuming: what a run that continues a checkpoint must share with the run that saved it, each rule a check that
fails in one line before anything trains. The folder it writes into (check_out_dir), the stage (check_resumed_stage),
the model and tokenizer (check_same_model), the data stream (check_base_resume for pretraining, check_chat_resume and
check_same_stream for the chat stages) and the steps already done (check_not_past).

The Trainer (loop.py) checks what it is given; the workflows (pipeline.setup) and the CLIs check earlier, before any
download, what they can read from the checkpoint's small files. Loading the saved state is the Trainer's.
"""

from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data.tokenizer import load_tokenizer, tokenizer_id
from nanochat_flyte.errors import ConfigError, location_named
from nanochat_flyte.files import local_path
from nanochat_flyte.model.checkpoint import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_DIR,
    TRAINING_STATE_FILE,
    model_differences,
    read_checkpoint_json,
    read_training_state,
    same_location,
)
from nanochat_flyte.reporting.tracking import RUN_INFO_FILE
from nanochat_flyte.schema import check_no_surrounding_space

# What a resumed pretraining run must share with the run it continues: the model's shape and the data stream's order.
RESUME_KEEPS = ("depth", "residual_scalars", "max_seq_len", "tokenizer", "bpe_vocab_size", "bpe_train_chars", "seed",
                "data_url", "num_shards", "val_shard", "only_needed_shards")


def check_out_dir(out_dir: Path, resume_dir: Path | None, owner: str = "Trainer", data_dir: Path | None = None) -> None:
    """A run writes its checkpoint into a folder that holds none, or continues the one there: a new run would
    overwrite another's weights, config and records (and a resume command would then mix the two). Nor is it the
    data directory the run reads (data_dir): their tokenizer folders would be one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("out_dir", f"{out_dir} is a file: the checkpoint goes in a folder", owner)
    if data_dir is not None and Path(data_dir).resolve() == out_dir.resolve():
        raise ConfigError("out_dir", f"{out_dir} is the data directory (data_dir): the checkpoint needs a folder of "
                                     "its own", owner)
    state = read_checkpoint_json(out_dir, TRAINING_STATE_FILE) if out_dir.is_dir() else None
    continued = resume_dir is not None and Path(resume_dir).resolve() == out_dir.resolve()
    if state is not None and not continued:
        raise ConfigError("out_dir", f"{out_dir} already holds a checkpoint (step {state.get('steps_completed')}); "
                                     "continue it with resume_dir (--resume-dir) set to it, or choose another folder",
                          owner)


def check_save_to_outside(save_to: str, out_dir: Path, data_dir: Path | None, owner: str) -> None:
    """save_to receives copies of the checkpoint folder: inside it, each copy would take the copies before it along
    (a checkpoint one folder deeper at every save); inside the data directory, a checkpoint among the data."""
    target = local_path(save_to) if save_to else None
    if target is None:
        return
    target = target.resolve()
    for folder, what in ((out_dir, "the checkpoint folder (out_dir)"), (data_dir, "the data directory (data_dir)")):
        if folder is not None and (target == Path(folder).resolve() or Path(folder).resolve() in target.parents):
            raise ConfigError("save_to", f"{save_to!r} is in {what} {folder}: copies of the checkpoint go "
                                         "outside it; choose another folder", owner)


def check_resumed_stage(checkpoint_dir: str | Path, stage: str, owner: str = "Trainer", field: str = "resume_dir"
                        ) -> dict:
    """A run continues a checkpoint of its own stage (base, chat or rl): another's data stream cannot be resumed.
    Returns the checkpoint's training state."""
    state = read_training_state(checkpoint_dir, field, owner)
    saved = state.get("stage", state.get("phase", "base"))  # saved before stages had names: the phase's
    if saved != stage:
        raise ConfigError(field, f"{checkpoint_dir} is a checkpoint of the {saved} stage; this {stage} run "
                                 "continues only its own stage's checkpoints", owner)
    return state


def check_not_past(num_iterations: int, steps_done: int, checkpoint: str | Path, owner: str = "RunConfig"
                   ) -> None:
    """A run resumed at a later step than its last one would never reach the end of its loop."""
    if num_iterations < steps_done:
        raise ConfigError("num_iterations", f"{num_iterations} is fewer than the {steps_done} steps the checkpoint "
                                            f"being resumed has done ({checkpoint})", owner)


def check_same_model(resume_dir: Path, model_config: dict, tokenizer, tokenizer_dir: Path) -> None:
    """The checkpoint to continue holds this run's model (shape and vocabulary, model_config) and was trained with its
    tokenizer: another's weights would fail to load, or load and read other token ids."""
    saved = read_checkpoint_json(resume_dir, MODEL_CONFIG_FILE) or {}
    different = model_differences(saved, model_config)
    differ = [f"{key} {saved[key]} (this run: {model_config[key]})" for key in model_config if key in different]
    if differ:
        raise ConfigError("resume_dir", f"{resume_dir} holds another model: {', '.join(differ)}", "Trainer")
    if (resume_dir / TOKENIZER_DIR).is_dir() and (tokenizer_id(load_tokenizer(resume_dir / TOKENIZER_DIR))
                                                  != tokenizer_id(tokenizer)):
        raise ConfigError("resume_dir", f"{resume_dir} was trained with another tokenizer than this run's "
                                        f"({tokenizer_dir}): its token ids would mean other text", "Trainer")


def check_base_resume(config: RunConfig, checkpoint: str | Path, field: str = "resume_from", owner: str = "main"
                      ) -> dict:
    """Fail early, in one line, when the pretraining `checkpoint` (a directory or URI) cannot be continued under
    `config`: no checkpoint there, a different model shape or data, or fewer iterations than it has already done.
    `owner.field` names where the checkpoint was given (the workflows' main.resume_from). Returns the config the
    checkpoint saved (fields newer than it at their defaults)."""
    check_no_surrounding_space(str(checkpoint), field, owner)
    with location_named(str(checkpoint), field, owner):
        state = read_checkpoint_json(checkpoint, TRAINING_STATE_FILE)
        saved = read_checkpoint_json(checkpoint, CONFIG_FILE)
        model = read_checkpoint_json(checkpoint, MODEL_CONFIG_FILE)
    if state is None or saved is None or model is None:
        raise ConfigError(field, f"{checkpoint} is not a checkpoint directory (no {TRAINING_STATE_FILE} "
                                 f"and {CONFIG_FILE})", owner)
    if state.get("phase", "base") != "base":
        raise ConfigError(field, f"{checkpoint} is a {state['phase']} checkpoint; pretraining continues a base "
                                 "checkpoint (a chat one goes on with chat_sft or chat_rl)", owner)
    saved = RunConfig().to_dict() | saved  # a field newer than the checkpoint has its default there
    for kept in RESUME_KEEPS:
        if kept.startswith("bpe_") and config.tokenizer != "bpe":
            continue  # a GPT-2 run never reads them
        value = getattr(config, kept)
        same = value == saved[kept] or kept == "data_url" and same_location(value, saved[kept])  # /data/ is /data
        if not same:
            raise ConfigError(kept, f"{value!r} differs from {saved[kept]!r} in the checkpoint being resumed "
                                    f"({checkpoint}); a resumed run keeps the model and the data")
    check_not_past(config.num_iterations, state["steps_completed"], checkpoint)
    for sizes in ("num_iterations", "total_batch_size"):  # their product sets the shards prepared
        if config.only_needed_shards and getattr(config, sizes) != saved[sizes]:
            raise ConfigError(sizes, f"a run prepared with only_needed_shards keeps its {sizes} ({saved[sizes]}): "
                                     "its data holds only the shards that many tokens need, and another value would "
                                     "change the data stream; a longer run is a new one with only_needed_shards: "
                                     "false")
    return saved


def check_chat_resume(resume_dir: Path, config: ChatConfig | RLConfig, data_keys: tuple[str, ...],
                      start_checkpoint: str, start_field: str, owner: str) -> None:
    """Fail before any download when the chat-stage checkpoint to continue holds another model than the start
    checkpoint (its weights would not load), or was trained on other data (its saved position in the stream would
    name other examples): the data settings data_keys, read from its run_info.json where it has one."""
    resumed, start = (read_checkpoint_json(path, MODEL_CONFIG_FILE) or {} for path in (resume_dir, start_checkpoint))
    differ = [f"{key} {start[key]} against {resumed[key]}" for key in sorted(model_differences(resumed, start))]
    if differ:
        raise ConfigError(start_field, f"{start_checkpoint} holds another model than the checkpoint being resumed, "
                                       f"{resume_dir}: {', '.join(differ)}", owner)
    info = read_checkpoint_json(resume_dir, RUN_INFO_FILE) or {}
    saved = info.get("chat_config" if isinstance(config, ChatConfig) else "rl_config") or {}
    for key in data_keys:
        if key in saved and key != "hf_endpoint" and saved[key] != getattr(config, key):  # (a mirror is the same data)
            raise ConfigError(key, f"{getattr(config, key)!r} differs from {saved[key]!r} in the checkpoint being "
                                   f"resumed ({resume_dir}); a resumed run keeps its data", type(config).__name__)


def check_same_stream(state: dict, seed: int, num_problems: int) -> None:
    """A resumed RL run's positions name the same problems only in the same stream: the same seed's permutations of
    as many problems. (States saved before they were recorded are taken as the same.)"""
    if state.get("seed", seed) != seed:
        raise ConfigError("seed", f"{seed} differs from {state['seed']} in the checkpoint being resumed: its problems "
                                  "would come in another order, some trained twice and some never", "RLConfig")
    if state.get("num_problems", num_problems) != num_problems:
        raise ConfigError("max_problems", f"the checkpoint being resumed took its problems from "
                                          f"{state['num_problems']:,}, this run has {num_problems:,}: give it the "
                                          "data it had (max_problems, the data directory)", "RLConfig")
