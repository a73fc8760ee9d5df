"""What the SFT and RL commands share: their arguments (`stage_arguments`), and under torchrun the hub data prepared
once per node into a cache folder, the start checkpoint fetched once per node, and the run itself (`run_stage`)."""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from nanochat_flyte.cli.usage import ArgumentParser, launcher_words, local_dir
from nanochat_flyte.config import ChatConfig, RLConfig, load_config
from nanochat_flyte.data import MANIFEST_FILE
from nanochat_flyte.data.chat_data import check_hub_endpoint, check_prepared_for, prepared_manifest
from nanochat_flyte.data.download import default_cache_dir
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.files import local_path, write_bytes_atomically
from nanochat_flyte.model.checkpoint import (
    CHECKPOINT_FILE,
    check_save_to,
    fetch_checkpoint,
    require_checkpoint,
)
from nanochat_flyte.pipeline.prepare import CHAT_DATA_VERSION, RL_DATA_FIELDS, SFT_DATA_FIELDS
from nanochat_flyte.pipeline.setup import check_device_here, stage_resume
from nanochat_flyte.reporting.environment import environment_report
from nanochat_flyte.schema import parse_overrides
from nanochat_flyte.training.loop import distributed_env
from nanochat_flyte.training.resume import check_out_dir, check_save_to_outside

DATA_WAIT_S = 3600  # other ranks wait this long for local rank 0 to prepare the data (a full SmolTalk download)
DATA_POLL_S = 5  # and look this often
FETCHED_FILE = "fetched_from.json"  # in a downloaded start checkpoint: its URI, written once the download is complete
SFT_DATA_KEYS = ("hf_endpoint", *SFT_DATA_FIELDS)  # what decides a stage's data: its cache folder's key
RL_DATA_KEYS = ("hf_endpoint", *RL_DATA_FIELDS)


def stage_arguments(command: str, doc: str, kind: type[ChatConfig] | type[RLConfig], start_flag: str,
                    start_help: str, argv: list[str] | None) -> tuple[ChatConfig | RLConfig, argparse.Namespace]:
    """The stage's command line: the checkpoint it starts from, --out-dir, a preset with field=value overrides,
    --data-dir and --resume-dir. Returns the validated config and the arguments."""
    parser = ArgumentParser(command, doc)
    parser.add_argument(start_flag, required=True, help=f"{start_help} directory or fsspec URI")
    parser.add_argument("--out-dir", type=local_dir, required=True,
                        help="where the stage's checkpoint directory is written")
    parser.add_argument("--config", help=f"a {kind.__name__} preset (YAML or JSON)")
    parser.add_argument("--data-dir", type=local_dir,
                        help="the stage's prepared data (default: prepared from $HF_ENDPOINT into a cache folder)")
    parser.add_argument("--resume-dir", type=local_dir, help="a checkpoint directory of this stage to continue from")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides, kind)
    return load_config(args.config, kind, **overrides).validate(), args


def data_cache_dir(name: str, config: ChatConfig | RLConfig, keys: tuple[str, ...]) -> Path:
    """Where a CLI prepares its hub data: a cache folder keyed by everything that decides its contents, the format's
    version included (the workflows' caches have it too)."""
    fingerprint = json.dumps({key: getattr(config, key) for key in keys} | {"env": os.environ.get("HF_ENDPOINT", ""),
                                                                             "version": CHAT_DATA_VERSION},
                             sort_keys=True)
    return default_cache_dir(name) / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def once_per_node(is_done: Callable[[], bool], work: Callable[[], object], what: str) -> None:
    """Local rank 0 runs work() unless is_done() already; the other ranks of its node wait until is_done(). Per
    node, because each node writes to its own disk (on a shared one the nodes write the same files, atomically)."""
    if is_done():
        return
    if distributed_env()[1] == 0:
        work()
        return
    deadline = time.monotonic() + DATA_WAIT_S
    while not is_done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not prepare {what} within {DATA_WAIT_S:.0f}s")
        time.sleep(DATA_POLL_S)


def fetched_once_per_node(source: str, local_dir: Path, owner: str) -> Path:
    """The checkpoint to start from as a local directory: a local path in place; a URI downloaded into local_dir by
    one rank per node (ranks fetching into one folder together would overwrite each other's half-written files).
    A folder that holds the same URI's complete download already is reused."""
    if local_path(source) is not None:
        return fetch_checkpoint(source, local_dir)
    marker = local_dir / FETCHED_FILE  # written first, and again with "complete" once the download is
    # (atomically: a waiting rank reads it meanwhile)
    if local_dir.is_dir() and any(local_dir.iterdir()) and not marker.is_file():
        raise ConfigError("out_dir", f"{local_dir}, where the start checkpoint is downloaded to, holds files this "
                                     "command did not put there: move them, or choose another out_dir", owner)

    def fetched() -> bool:
        return marker.is_file() and json.loads(marker.read_text()) == {"source": source, "complete": True}

    def fetch() -> None:
        require_checkpoint(source)  # before the folder's earlier download goes
        local_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(marker, [json.dumps({"source": source, "complete": False}).encode()])
        # another source's files must not mix with this one's; the marker stays, so that the other ranks never
        # find the folder without it
        for path in local_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path != marker:
                path.unlink()
        fetch_checkpoint(source, local_dir)
        write_bytes_atomically(marker, [json.dumps({"source": source, "complete": True}).encode()])

    once_per_node(fetched, fetch, f"{local_dir} from {source}")
    return local_dir


def run_stage(config: ChatConfig | RLConfig, start_checkpoint: str, args,
              check_start: Callable[[ChatConfig | RLConfig, str], ChatConfig | RLConfig],
              prepare: Callable[[ChatConfig | RLConfig, Path], object], train: Callable[..., dict]) -> dict:
    """What the SFT and RL CLIs do once their arguments are parsed. First what can fail in one line: the device, the
    config against the start checkpoint (check_start: pipeline.setup's sft_start or rl_start, as the workflows check),
    --data-dir, --out-dir (a folder with a checkpoint in it is continued, never overwritten), --resume-dir, save_to,
    and the hub where data is to be prepared. Then fetch the start checkpoint and prepare the hub data into a cache
    folder (one rank per node) unless --data-dir names prepared data; train; print the summary. (No sandbox check:
    the CLIs train, and chat-eval evaluates.)"""
    rank = distributed_env()[0]
    sft = isinstance(config, ChatConfig)
    stage, data_keys = ("chat_sft", SFT_DATA_KEYS) if sft else ("chat_rl", RL_DATA_KEYS)
    check_device_here(config, remote=False)
    config = check_start(config, start_checkpoint)  # before any download: a batch that does not fit fails in seconds
    if args.data_dir:  # data named by the user is used as it is, never prepared into
        check_prepared_for(config, prepared_manifest(args.data_dir, stage), args.data_dir)
    check_out_dir(args.out_dir, args.resume_dir, stage, args.data_dir)
    check_save_to_outside(config.save_to, args.out_dir, args.data_dir, type(config).__name__)
    continues = stage_resume(config, start_checkpoint, str(args.resume_dir or ""), "resume_dir")
    check_save_to(config.save_to, type(config).__name__, continues=continues)
    data_dir = args.data_dir or data_cache_dir("sft_data" if sft else "rl_data", config, data_keys)
    if not (data_dir / MANIFEST_FILE).exists() and distributed_env()[1] == 0:  # the rank that will download
        check_hub_endpoint(config)
    out_dir = args.out_dir.resolve()  # (`--out-dir .` has no name to derive a sibling's from)
    start_dir = fetched_once_per_node(start_checkpoint, out_dir.with_name(out_dir.name + "_start"), stage)
    once_per_node((data_dir / MANIFEST_FILE).exists, lambda: prepare(config, data_dir), f"the data in {data_dir}")
    try:
        summary = train(config, start_dir, data_dir, args.out_dir, resume_dir=args.resume_dir,
                        env_report=environment_report() if rank == 0 else None)
    except (KeyboardInterrupt, SystemExit):
        if rank == 0 and (args.out_dir / CHECKPOINT_FILE).exists():
            print(f"resume with: {resume_command(args, 'sft' if sft else 'rl', start_checkpoint)}", flush=True)
        raise
    if rank == 0:
        print(json.dumps(summary, indent=2), flush=True)
    return summary


def resume_command(args: argparse.Namespace, command: str, start_checkpoint: str) -> str:
    """The command line that continues this run from its last save in --out-dir: the same start checkpoint, preset,
    overrides and data, and --resume-dir set to --out-dir."""
    start_flag = "--base-checkpoint" if command == "sft" else "--sft-checkpoint"
    words = [*launcher_words(command), start_flag, start_checkpoint, "--out-dir", str(args.out_dir)]
    words += ["--config", args.config] if args.config else []
    words += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    return shlex.join([*words, "--resume-dir", str(args.out_dir), *args.overrides])
