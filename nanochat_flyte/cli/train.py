"""Pretrain a base model on a prepared data directory (from `nanochat prepare`).

examples:
  nanochat train --config configs/smoke.yaml --data-dir runs/data --out-dir runs/base
  nanochat train --config configs/smoke.yaml --data-dir runs/data --out-dir runs/base2 depth=4 num_iterations=200
  nanochat train --config runs/base/config.json --data-dir runs/data --out-dir runs/base --resume-dir runs/base
  torchrun --nproc_per_node=2 -m nanochat_flyte train --config configs/d8_t4.yaml --data-dir DATA --out-dir OUT

field=value overrides a field of the preset. --resume-dir continues from a checkpoint's step with the optimizer,
data position and RNG states it saved; with a larger num_iterations it extends a finished run.
"""

import json
import shlex

from nanochat_flyte.cli.usage import ArgumentParser, launcher_words, local_dir
from nanochat_flyte.config import RunConfig, load_config
from nanochat_flyte.model.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, check_save_to
from nanochat_flyte.reporting.environment import environment_report
from nanochat_flyte.schema import parse_overrides
from nanochat_flyte.training.loop import distributed_env
from nanochat_flyte.training.pretrain import train
from nanochat_flyte.training.resume import check_base_resume, check_out_dir, check_save_to_outside


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser("train", __doc__)
    parser.add_argument("--config", help="a RunConfig preset (YAML or JSON); defaults to the reference run")
    parser.add_argument("--data-dir", type=local_dir, required=True, help="a prepared data directory")
    parser.add_argument("--out-dir", type=local_dir, required=True, help="where the checkpoint directory is written")
    parser.add_argument("--resume-dir", type=local_dir, help="a checkpoint directory to continue from")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    rank = distributed_env()[0]
    config = load_config(args.config, **parse_overrides(args.overrides, RunConfig)).validate()
    check_out_dir(args.out_dir, args.resume_dir, "train", args.data_dir)
    check_save_to_outside(config.save_to, args.out_dir, args.data_dir, "RunConfig")
    continues = check_base_resume(config, args.resume_dir, "resume_dir", "train")["run_name"] if args.resume_dir else ""
    check_save_to(config.save_to, "RunConfig", continues=continues)  # a new run writes over no other run's copy
    try:
        summary = train(config, args.data_dir, args.out_dir, resume_dir=args.resume_dir,
                        env_report=environment_report() if rank == 0 else None)
    except (KeyboardInterrupt, SystemExit):
        if rank == 0 and (args.out_dir / CHECKPOINT_FILE).exists():
            out_dir = shlex.quote(str(args.out_dir))
            print(f"resume with: {shlex.join(launcher_words('train'))} "
                  f"--config {shlex.quote(str(args.out_dir / CONFIG_FILE))} "
                  f"--data-dir {shlex.quote(str(args.data_dir))} --out-dir {out_dir} --resume-dir {out_dir}",
                  flush=True)
        raise
    if rank == 0:
        print(json.dumps(summary, indent=2), flush=True)
    return summary
