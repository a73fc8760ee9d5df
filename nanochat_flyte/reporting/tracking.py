"""Run tracking: Weights & Biases (with an offline fallback), plus metrics.jsonl and samples.jsonl.

The two JSON-lines files in the output directory are the durable record: every step is appended and flushed
before W&B sees it, so a run is fully described even when W&B is unreachable. W&B is best effort: a missing
network, a bad key or a service error at init or at log time never fails training; the Tracker falls back to
an offline run (under out_dir/wandb, `wandb sync`-able later) or, if that fails too, to no W&B at all, with a
single warning line.

Run id: inside a Flyte execution the W&B run id is the execution name (FLYTE_INTERNAL_EXECUTION_ID; Flyte 2's
training tasks set it to the run's name), the same convention as flytekitplugins-wandb, so a console link can point
at the run and every retry of the task resumes the same run; a fine-tuning run in the same execution is
"<execution>-chat", an RL run "<execution>-rl". Elsewhere a resumed run reuses the id stored in out_dir/wandb_run_id.
Evaluations after training (CORE, chat evaluation) add their numbers to the online run of the checkpoint they
evaluated (log_evaluation).
"""

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import wandb
except ImportError:  # W&B is optional where it is off: the GPU acceptance machine has no wandb package
    wandb = None

from nanochat_flyte.config import RunConfig
from nanochat_flyte.files import filesystem, write_atomically
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.reporting.environment import wandb_key_available

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
RUN_INFO_FILE = "run_info.json"  # config, parameters, FLOPs/token, environment: what the report card reads
RUN_ID_FILE = "wandb_run_id"
RUN_ID_ENV = "FLYTE_INTERNAL_EXECUTION_ID"  # the Flyte execution's name: the W&B run id
SAMPLE_COLUMNS = ["step", "prompt", "completion"]
# A reachable W&B answers in a few seconds; a dead one should cost the GPU little time before we go offline.
# WANDB_INIT_TIMEOUT (W&B's own variable) overrides it.
DEFAULT_INIT_TIMEOUT_S = 30.0
# Upload at finish is bounded too; whatever is left stays in out_dir/wandb for `wandb sync`.
FINISH_TIMEOUT_S = 300.0
# Modes tried in order: online falls back to offline, offline to nothing.
FALLBACKS = {"online": ("online", "offline"), "offline": ("offline",), "disabled": ()}


def resolve_mode(requested: str) -> str:
    """'auto' means online when a W&B API key is present (WANDB_API_KEY or `wandb login`), offline otherwise."""
    if requested == "auto":
        return "online" if wandb_key_available() else "offline"
    return requested


def read_logged_records(path: Path) -> list[dict[str, Any]]:
    """The records of a log this module appends to (metrics.jsonl, samples.jsonl); a line torn by a crash
    mid-write is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the lines with step <= last_step, so a run resumed at last_step does not log steps twice."""
    kept = [record for record in read_logged_records(path) if record.get("step", 0) <= last_step]
    if path.exists():
        text = "".join(json.dumps(record) + "\n" for record in kept)
        write_atomically(path, lambda temp: temp.write_text(text))  # a crash leaves the old file or the new one
    return kept


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    # default=float turns numpy / 0-d tensor scalars into plain numbers
    with path.open("a") as file:
        file.write(json.dumps(record, default=float) + "\n")
        file.flush()


class Tracker:
    """Logs one training run. On ranks other than 0 every method does nothing (one writer per run).

    modes: the W&B modes to try in turn, at the start and when logging fails (default: the config's mode and its
    fallbacks); kept_in: where the numbers are whatever W&B does, as its warnings say."""

    def __init__(self, config: RunConfig, out_dir: Path, env_report: dict | None = None, rank: int = 0,
                 resume_step: int | None = None, phase: str = "base", modes: tuple[str, ...] | None = None,
                 kept_in: str = METRICS_FILE, run_id: str = ""):
        self.config, self.phase, self.kept_in = config, phase, kept_in
        self.modes = FALLBACKS[resolve_mode(config.wandb_mode)] if modes is None else modes
        self.out_dir = Path(out_dir)
        self.is_writer = rank == 0
        self.run = None
        self.mode = "disabled"
        self.wandb_last_step = -1
        self.url: str | None = None
        self.offline_dir: Path | None = None
        self.sample_rows: list[list[Any]] = []
        if not self.is_writer:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            if resume_step is not None:
                truncate_jsonl(self.out_dir / name, resume_step)
            else:  # a new run in a used directory: the old run's records would mix with this one's
                (self.out_dir / name).unlink(missing_ok=True)
        # the W&B samples table is cumulative: a resumed run starts with the samples already taken
        self.sample_rows = [table_row(row["step"], row) for row in read_logged_records(self.out_dir / SAMPLES_FILE)]
        self.run_id = run_id or self._choose_run_id(resuming=resume_step is not None)
        self.run_info: dict[str, Any] = {"config": config.to_dict(), "environment": env_report}
        self._write_run_info()
        self._start_wandb(self.modes)

    # ------------------------------------------------------------------ W&B lifecycle

    def _choose_run_id(self, resuming: bool) -> str:
        id_file = self.out_dir / RUN_ID_FILE
        run_id = os.environ.get(RUN_ID_ENV)
        if run_id:
            run_id = stage_run_id(run_id, self.phase)
        if not run_id and resuming and id_file.exists():
            run_id = id_file.read_text().strip()
        run_id = run_id or secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        write_atomically(id_file, lambda temp: temp.write_text(run_id))  # a torn, empty id would start a new run
        return run_id

    def _init_run(self, mode: str):
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S))
        run = wandb.init(
            project=self.config.wandb_project or "nanochat",
            entity=self.config.wandb_entity or None,
            name=self.config.run_name or None,
            id=self.run_id,
            resume="allow",  # a retry or a resume continues the same run
            dir=self.out_dir,  # the run lands in out_dir/wandb and travels with the checkpoint directory
            # what this process does not know (an evaluation's has no environment report) leaves a resumed run's
            config={key: value for key, value in self.run_info.items() if value is not None},
            mode=mode,
            # no 'latest-run' symlink in the uploaded directory; quiet: no W&B run summary at the end of each stage
            # (the stage's own summary names the run's URL)
            settings=wandb.Settings(init_timeout=init_timeout, finish_timeout=FINISH_TIMEOUT_S, symlink=False,
                                    quiet=True),
        )
        # A custom x-axis: "step" is in every row, so every metric (val/bpb, rl/reward, core_metric, the samples)
        # plots against the training step, also the evaluations added to a finished run at its next _step (W&B's
        # own step, which log() otherwise sets to the training step).
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def attach(self, run, mode: str) -> None:
        """Log to this W&B run from now on. W&B resumes a run with its summary, whose "step" is the training step of
        the last row it has (none: -1)."""
        self.run, self.mode = run, mode
        self.wandb_last_step = run.summary.get("step", -1)

    def _start_wandb(self, modes: tuple[str, ...], trouble: str = "") -> None:
        """Start the first mode of `modes` that works; warn once if any failed (or if `trouble` says why)."""
        self.run, self.mode = None, "disabled"
        problems = [trouble] if trouble else []
        if modes and wandb is None:
            problems, modes = problems + ["the wandb package is not installed"], ()
        runs_dir = self.out_dir / "wandb"
        for mode in modes:
            runs_before = set(runs_dir.glob("*")) if runs_dir.is_dir() else set()
            try:
                self.attach(self._init_run(mode), mode)
                break
            except Exception as error:  # W&B must never fail training
                problems.append(f"{mode} init failed: {self._redact(error)}")
                wandb.teardown()  # the failed attempt keeps the run id reserved in W&B's service process
                # its empty run folder, which `wandb sync --sync-all` would upload under the run's id
                for made in set(runs_dir.glob("*")) - runs_before if runs_dir.is_dir() else ():
                    shutil.rmtree(made, ignore_errors=True)
        if self.mode == "offline":
            self.offline_dir = Path(self.run.settings.sync_dir)
        if problems:
            fallback = f"logging offline to {self.offline_dir}" if self.mode == "offline" else "W&B disabled"
            logger.warning("W&B: %s; %s (%s has every number either way)", "; ".join(problems), fallback,
                           self.kept_in)

    def _wandb_call(self, action) -> None:
        """Run a W&B call; if it fails, switch to offline (or to nothing if offline itself failed)."""
        if self.run is None:
            return
        try:
            action()
        except Exception as error:  # W&B must never fail training
            failed_mode = self.mode
            wandb.teardown()
            self._start_wandb(self.modes[self.modes.index(failed_mode) + 1:],
                              trouble=f"{failed_mode} logging failed: {self._redact(error)}")

    @staticmethod
    def _redact(error: Exception) -> str:
        """The error text, with the API key removed should a library ever echo it."""
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        key = os.environ.get("WANDB_API_KEY")
        return text.replace(key, "<WANDB_API_KEY>") if key else text

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: dict[str, float | int | None], as_wandb_step: bool = True) -> None:
        """One row of metrics at a training step; None values (not measured this step) are dropped.
        as_wandb_step: W&B's own _step is the training step, so that a resumed run never appends a step W&B has
        (one at or below the last it has is left to metrics.jsonl); False for numbers added to a finished run."""
        if not self.is_writer:
            return
        values = {key: value for key, value in metrics.items() if value is not None}
        append_jsonl(self.out_dir / METRICS_FILE, {"step": step, "time": time.time(), **values})
        self._wandb_call(lambda: self._wandb_log({**values, "step": step}, step if as_wandb_step else None))

    def _wandb_log(self, row: dict[str, Any], step: int | None) -> None:
        if step is None:  # numbers added to a finished run (log_evaluation): at W&B's next step
            self.run.log(row)
        elif step > self.wandb_last_step:  # a row W&B lacks (a run resumed from an earlier save repeats some it has)
            if step >= self.run.step:
                self.run.log(row, step=step)
            else:  # below W&B's own step: a finished run's history ends with the evaluations logged after its last
                # step, at W&B's next steps, and its extension's rows go after them (the x-axis is "step"); W&B
                # would drop a lower step itself
                self.run.log(row)

    def log_config(self, extra: dict[str, Any]) -> None:
        """Facts known once the model exists: parameter count, FLOPs per token, and the like."""
        if not self.is_writer:
            return
        self.run_info.update(extra)
        self._write_run_info()
        self._wandb_call(lambda: self.run.config.update(extra, allow_val_change=True))

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Generated text at a step: appended to samples.jsonl and shown in one cumulative W&B table."""
        if not self.is_writer:
            return
        for sample in samples:
            append_jsonl(self.out_dir / SAMPLES_FILE, {"step": step, **sample})
            self.sample_rows.append(table_row(step, sample))
        # a fresh table with every row so far: the newest version in the W&B UI shows all sampling points
        self._wandb_call(lambda: self._wandb_log({"samples": wandb.Table(columns=SAMPLE_COLUMNS,
                                                                         data=self.sample_rows), "step": step}, step))

    def set_summary(self, summary: dict[str, Any]) -> None:
        """Final numbers (min/final validation bpb, total time, tokens seen) into the W&B run's summary."""
        if not self.is_writer:
            return
        self._wandb_call(lambda: self.run.summary.update(summary))

    def finish(self) -> str | None:
        """Close the W&B run. Returns the run URL when it was logged online."""
        if self.run is None:
            return self.url
        try:
            if self.mode == "online":
                self.url = self.run.url
            self.run.finish()
            # finish() can return before W&B's service has written the run's .wandb file; shutting the service
            # down waits for that, and the directory is uploaded (or read back) right after training.
            wandb.teardown()
        except Exception as error:  # a failed upload leaves the run in out_dir/wandb for `wandb sync`
            logger.warning("W&B: finish failed: %s; the run stays in %s", self._redact(error), self.out_dir / "wandb")
        self.run = None
        return self.url

    def _write_run_info(self) -> None:
        text = json.dumps(self.run_info, indent=2, default=str)
        write_atomically(self.out_dir / RUN_INFO_FILE, lambda temp: temp.write_text(text))


def table_row(step: int, sample: dict[str, str]) -> list[Any]:
    """A sample as a row of the W&B samples table: the model's text shown, never obeyed (hostile_text)."""
    return [step, shown(sample["prompt"]), shown(sample["completion"])]


def stage_run_id(execution: str, stage: str) -> str:
    """The W&B run id of a stage of the Flyte execution (or run) `execution`: pretraining's is the execution's name,
    a later stage's has the stage after it (`<execution>-chat`, `<execution>-rl`), so that one execution's stages are
    runs of their own. The consoles' W&B links spell the same ids."""
    return execution if stage == "base" else f"{execution}-{stage}"


def console_link_settings() -> dict[str, str] | None:
    """Where a Flyte console's W&B link points, read at registration: NANOCHAT_WANDB_ENTITY, and
    NANOCHAT_WANDB_PROJECT / NANOCHAT_WANDB_HOST where they differ from "nanochat" / https://wandb.ai. The link's URL
    is host/entity/project/runs/<run id>: no entity, no link (None)."""
    entity = os.environ.get("NANOCHAT_WANDB_ENTITY", "")
    if not entity:
        return None
    return {"entity": entity, "project": os.environ.get("NANOCHAT_WANDB_PROJECT", "nanochat"),
            "host": os.environ.get("NANOCHAT_WANDB_HOST", "https://wandb.ai")}


def log_evaluation(config: RunConfig, checkpoint: str, step: int, metrics: dict[str, float], summary: dict[str, Any],
                   phase: str = "base") -> str | None:
    """Add an evaluation's numbers to the W&B run that trained `checkpoint` (a directory or fsspec URI), at the
    training step it ended on. The run id comes from the checkpoint's wandb_run_id, or from the Flyte execution.
    Returns the run's URL when online. The numbers are in the results JSON whatever W&B does; W&B offline, they
    stay there only (an offline run written here would be thrown away with its temporary folder)."""
    if resolve_mode(config.wandb_mode) != "online":
        return None
    with tempfile.TemporaryDirectory(prefix="nanochat-eval-wandb-") as scratch:
        store, root = filesystem(str(checkpoint))
        id_file = f"{root.rstrip('/')}/{RUN_ID_FILE}"
        # the checkpoint's own run first: a recovered Flyte execution has another name than the one that trained it
        run_id = store.cat_file(id_file).decode().strip() if store.exists(id_file) else ""
        # online only: an offline run written here would be deleted with `scratch`
        tracker = Tracker(config, Path(scratch), resume_step=step, phase=phase, modes=("online",),
                          kept_in="the results JSON", run_id=run_id)
        tracker.log(step, metrics, as_wandb_step=False)
        tracker.set_summary(summary)
        return tracker.finish()
