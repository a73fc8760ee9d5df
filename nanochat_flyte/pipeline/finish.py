"""The end of a stage: its results JSON and report card written (and copied to save_to), and a few lines a person
reads: where the checkpoint, report and results are, the numbers that matter, and the next command.

A cluster's task log also gets the whole results JSON; a local run, where every task prints to one terminal, does
not (it is in results.json).
"""

import json
import shlex
from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.evaluation.chat_eval import chat_table_markdown
from nanochat_flyte.evaluation.core import core_table_markdown
from nanochat_flyte.model.checkpoint import checkpoint_run_config, publish_checkpoint
from nanochat_flyte.reporting.report import REPORT_FILE, write_run_report
from nanochat_flyte.reporting.results import RESULTS_FILE, aggregate_results, chat_results, write_results


def finish_base_run(config: RunConfig, environment: dict, manifest: dict, training: dict, checkpoint: str,
                    core: dict, report_dir: Path, *, local: bool) -> dict:
    """Pretraining's results JSON and report card (with the CORE table) in report_dir; returns the results.
    `checkpoint`: where the checkpoint lives (a URI on a cluster, a path locally)."""
    results = aggregate_results(config, environment, manifest, training, checkpoint_dir=checkpoint,
                                core=core)
    write_run_report(checkpoint, report_dir, config, environment, training,
                     evaluations=(core_table_markdown(core),) if core else ())
    publish(results, report_dir, config.save_to, local)
    metrics = [f"val bpb {training['final_validation_bpb']:.4f}"]
    if core:
        metrics.append(f"CORE {core['core_metric']:.4f}")
    kept = shlex.quote(str(config.save_to or checkpoint))  # pasted into a shell
    print_summary("base model", training, metrics, checkpoint, report_dir, config.save_to, [
        f"nanochat sample --checkpoint {kept} --prompt 'The capital of France is'",
        f"nanochat sft --base-checkpoint {kept} --out-dir runs/chat --config {next_preset('chat', training)}"], local)
    return results


def finish_chat_run(config: ChatConfig | RLConfig, start_checkpoint: str, training: dict, evaluation: dict,
                    environment: dict, checkpoint: str, report_dir: Path, *, local: bool) -> dict:
    """The results JSON and report card (with the chat evaluation table) of SFT or RL; returns the results."""
    results = chat_results(config.to_dict(), start_checkpoint, training, evaluation, checkpoint)
    run_config = checkpoint_run_config(checkpoint)
    write_run_report(checkpoint, report_dir, run_config, environment, training,
                     evaluations=(chat_table_markdown(evaluation),))
    publish(results, report_dir, config.save_to, local)
    stage = "RL" if isinstance(config, RLConfig) else "SFT"
    validation = {key: value for key, value in training.items() if key.startswith("final_validation_")}
    metrics = [f"val {key.removeprefix('final_validation_')} {value:.4f}" for key, value in validation.items()
               if value is not None]
    if evaluation.get("chatcore") is not None:
        metrics.append(f"ChatCORE {evaluation['chatcore']:.4f}")
    metrics += [f"{task} {scores['accuracy']:.3f}" for task, scores in evaluation.get("tasks", {}).items()]
    # the copy the user chose outlives a local run's temporary folder; quoted: the lines are pasted into a shell
    kept = shlex.quote(str(config.save_to or checkpoint))
    next_steps = [f"nanochat chat --checkpoint {kept}", f"nanochat serve --checkpoint {kept}"]
    if stage == "SFT":
        next_steps.append(f"nanochat rl --sft-checkpoint {kept} --out-dir runs/rl "
                          f"--config {next_preset('rl', training)}")
    print_summary(f"{stage} chat model", training, metrics, checkpoint, report_dir, config.save_to, next_steps,
                  local)
    return results


def next_preset(stage: str, training: dict) -> str:
    """The preset of the next stage (chat or rl) for a run like this one: the T4 reference's after a model of the
    reference's size or more on a CUDA GPU, else the smoke recipe (a laptop's CPU or Apple GPU, a tiny model)."""
    reference = training.get("device") == "cuda" and (training.get("depth") or 0) >= 8
    return f"configs/{stage}_{'d8_t4' if reference else 'smoke'}.yaml"


def publish(results: dict, report_dir: Path, save_to: str, local: bool) -> None:
    """results.json beside the report card, both copied next to the checkpoint's save_to copy."""
    write_results(results, report_dir)
    if not local:
        print(json.dumps(results, indent=2, default=str), flush=True)  # the task's log keeps the whole JSON
    if save_to:  # the run's outputs in one place the user chose
        publish_checkpoint(report_dir, save_to)


def print_summary(what: str, training: dict, metrics: list[str], checkpoint: str, report_dir: Path, save_to: str,
                  next_steps: list[str], local: bool) -> None:
    """The run in a few lines. On a cluster report_dir is the pod's own folder, gone with it: the report and the
    results are the task's outputs, which the console shows."""
    steps, minutes = training.get("steps_completed"), (training.get("total_time_s") or 0) / 60
    lines = [f"== {what}: {training.get('run_name')} ({training.get('status')}, {steps} steps, {minutes:.1f} min)",
             f"   {' | '.join(metrics)}",
             f"   checkpoint: {checkpoint}"]
    if local:
        lines += [f"   report:     {report_dir / REPORT_FILE}", f"   results:    {report_dir / RESULTS_FILE}"]
    if save_to:
        lines.append(f"   copies in:  {save_to}")
    if training.get("wandb_url"):
        lines.append(f"   W&B:        {training['wandb_url']}")
    lines += ["   next:"] + [f"     {command}" for command in next_steps]
    print("\n".join(lines), flush=True)
