"""Download and tokenize the shards a run needs into a data directory (what `nanochat train --data-dir` takes).

examples:
  nanochat prepare --config configs/smoke.yaml --out-dir runs/data
  nanochat prepare --config configs/d8_t4.yaml --out-dir /data/d8 data_url=s3://my-bucket/fineweb num_shards=10

The preset's data fields (data_url, num_shards, val_shard, tokenizer, ...) decide the data; field=value overrides
them. Every shard is checked to answer before any download.
"""

from pathlib import Path

from nanochat_flyte.cli.usage import ArgumentParser, local_dir
from nanochat_flyte.config import RunConfig, load_config
from nanochat_flyte.data.download import check_data_url
from nanochat_flyte.data.prepare import prepare_data
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.files import local_path
from nanochat_flyte.model.checkpoint import CHECKPOINT_FILE, TRAINING_STATE_FILE
from nanochat_flyte.schema import parse_overrides


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser("prepare", __doc__)
    parser.add_argument("--config", help="a RunConfig preset (YAML or JSON): its data fields (data_url, num_shards, "
                                          "val_shard, tokenizer, ...) decide the data; defaults to the reference run")
    parser.add_argument("--out-dir", type=local_dir, required=True, help="the data directory to write")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, **parse_overrides(args.overrides, RunConfig)).validate()
    source = local_path(config.data_url)
    if source is not None and source.resolve() == args.out_dir.resolve():  # the data would be written among its shards
        raise ConfigError("out_dir", f"{args.out_dir} is data_url's folder: the data directory needs one of its own",
                          "prepare")
    check_not_a_checkpoint(args.out_dir)
    check_data_url(config)  # every shard answers, before any download
    return prepare_data(config, args.out_dir)  # prints what it downloads and tokenizes, then the data's totals


def check_not_a_checkpoint(out_dir: Path) -> None:
    """A data directory is not written into a checkpoint directory: its tokenizer folder would replace the
    checkpoint's, whose token ids the weights were trained on."""
    if found := [name for name in (CHECKPOINT_FILE, TRAINING_STATE_FILE) if (out_dir / name).exists()]:
        raise ConfigError("out_dir", f"{out_dir} holds a checkpoint ({', '.join(found)}): the data directory "
                                     "(--out-dir) needs a folder of its own, or it would replace the checkpoint's "
                                     "tokenizer", "prepare")
