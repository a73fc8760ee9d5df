"""What a finished run looks like: plots, the report card (report.md) and the HTML of the Flyte Decks.

Everything is read from the files the Tracker wrote (metrics.jsonl, samples.jsonl, run_info.json), so a report
can be rebuilt from any checkpoint directory. Plots use matplotlib's Figure directly (the Agg canvas): no
display, no global pyplot state.
"""

import base64
import html
import io
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from nanochat_flyte.files import filesystem
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.reporting.tracking import METRICS_FILE, RUN_INFO_FILE, SAMPLES_FILE, read_logged_records

REPORT_FILE = "report.md"
LOSS_PLOT = "loss.png"
THROUGHPUT_PLOT = "throughput.png"
FIGURE_SIZE = (11, 4)  # inches: two panels side by side
DPI = 100

# ---------------------------------------------------------------------------- formatting


def format_value(value: Any, decimals: int | None = None) -> str:
    """A number for people: 36,700,160 parameters, 15,000 tokens/s, 1.234 bpb (with decimals: that many, 2.1100);
    None is n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if decimals is not None else (
            f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}")
    return str(value)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&])")  # characters Markdown or HTML may read as syntax


def markdown_text(text: str) -> str:
    """Text as Markdown shows it, as written: each character Markdown or HTML could read as syntax is
    backslash-escaped."""
    return MARKDOWN_SYNTAX.sub(r"\\\1", text)


def markdown_sample(prompt: str, completion: str) -> str:
    """A sample: the prompt in bold, then the completion in a fenced block, as the model wrote it, line breaks and
    leading newlines included. Nothing a model writes is read as Markdown or HTML there (a link, an image that
    loads from a server of its choosing): the fence is longer than any run of backticks in the completion. Its
    control and bidi characters are spelled out (hostile_text.shown), so `cat report.md` obeys none of them."""
    completion = shown(completion)
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", completion)), default=0))
    return f"**{markdown_text(shown(prompt.strip()))}**\n\n{fence}\n{completion}\n{fence}"


def as_written(values: dict[str, Any]) -> dict[str, str]:
    """Settings shown exactly as given (no thousands separators: val_shard is 1822, not 1,822)."""
    return {key: "n/a" if value is None else str(value) for key, value in values.items()}


def config_dict(config) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


# ---------------------------------------------------------------------------- plots


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in metrics if row.get(key) is not None]
    return [row["step"] for row in rows], [row[key] for row in rows]


VALIDATION_METRICS = {"val/bpb": ("Validation bits per byte", "bpb"),  # pretraining
                      "val/loss": ("Validation loss (assistant tokens)", "cross-entropy (nats)"),  # fine-tuning
                      "val/pass@1": ("Validation GSM8K pass@1 (greedy)", "share of problems solved")}  # RL


def loss_figure(metrics: list[dict]) -> Figure | None:
    """Training loss (raw and smoothed), or in RL the mean reward, and the validation metric against the step."""
    if not any("train/loss" in row or any(key in row for key in VALIDATION_METRICS) for row in metrics):
        return None
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="tight")
    loss_axes, val_axes = figure.subplots(1, 2)
    if any("rl/reward" in row for row in metrics):  # RL's loss is a surrogate; its reward says how it learns
        loss_axes.plot(*series(metrics, "rl/reward"), label="mean reward of the step's answers")
        loss_axes.set(title="Reward", xlabel="step", ylabel="reward")
    else:
        loss_axes.plot(*series(metrics, "train/loss"), alpha=0.3, label="loss")
        loss_axes.plot(*series(metrics, "train/loss_smooth"), label="loss (smoothed)")
        loss_axes.set(title="Training loss", xlabel="step", ylabel="cross-entropy (nats)")
    loss_axes.legend()
    key = next((key for key in VALIDATION_METRICS if any(key in row for row in metrics)), "val/bpb")
    title, label = VALIDATION_METRICS[key]
    val_axes.plot(*series(metrics, key), marker="o", color="tab:green")
    val_axes.set(title=title, xlabel="step", ylabel=label)
    for axes in (loss_axes, val_axes):
        axes.grid(alpha=0.3)
    return figure


def throughput_figure(metrics: list[dict]) -> Figure | None:
    """Tokens per second, and model FLOPs utilisation where it is known (not on a CPU), against the step."""
    if not any("train/tok_per_sec" in row for row in metrics):
        return None
    has_mfu = any(row.get("train/mfu") is not None for row in metrics)
    figure = Figure(figsize=FIGURE_SIZE if has_mfu else (FIGURE_SIZE[0] / 2, FIGURE_SIZE[1]), dpi=DPI, layout="tight")
    speed_axes, *mfu_axes = figure.subplots(1, 2) if has_mfu else [figure.subplots(1, 1)]
    speed_axes.plot(*series(metrics, "train/tok_per_sec"))
    speed_axes.set(title="Throughput", xlabel="step", ylabel="tokens / s")
    for axes in mfu_axes:
        axes.plot(*series(metrics, "train/mfu"), color="tab:orange")
        axes.set(title="Model FLOPs utilisation", xlabel="step", ylabel="MFU (%)")
    for axes in (speed_axes, *mfu_axes):
        axes.grid(alpha=0.3)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def run_figures(metrics: list[dict]) -> dict[str, Figure]:
    """The run's plots by file name; a plot with nothing to show (e.g. no steps yet) is left out."""
    figures = {LOSS_PLOT: loss_figure(metrics), THROUGHPUT_PLOT: throughput_figure(metrics)}
    return {name: figure for name, figure in figures.items() if figure is not None}


# ---------------------------------------------------------------------------- the numbers of a run


def headline_numbers(out_dir: Path, summary: dict) -> dict[str, str]:
    """The report card's first table: the training summary, with run_info.json filling in the model facts."""
    info_file = Path(out_dir) / RUN_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    parameters = summary.get("num_params", info.get("num_params"))
    flops_per_token = summary.get("flops_per_token", info.get("flops_per_token"))
    return {
        "parameters": format_value(parameters),
        "FLOPs per token": f"{flops_per_token:.3e}" if flops_per_token else "n/a",
        "steps completed": format_value(summary.get("steps_completed")),
        "tokens seen": format_value(summary.get("tokens_seen")),
        "wall time": format_duration(summary.get("total_time_s")),
        "average tokens / s": format_value(summary.get("avg_tok_per_sec")),
        "average MFU (%)": format_value(summary.get("avg_mfu")),
        # to the 4 decimals the log prints: runs that differ in the third are told apart (2.1097, not 2.11)
        **{f"{kind} validation {metric}": format_value(summary[f"{kind}_validation_{metric}"], decimals=4)
           for metric in ("bpb", "loss", "pass@1") for kind in ("min", "max", "final")
           if f"{kind}_validation_{metric}" in summary},
        "W&B run": summary.get("wandb_url") or ("offline, in the checkpoint's wandb/ (`wandb sync` uploads it)"
                                                if summary.get("wandb_mode") == "offline" else "none"),
    }


# ---------------------------------------------------------------------------- report.md


def markdown_grid(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of any number of columns; cells formatted as format_value does."""
    def line(cells: list[Any]) -> str:  # a bare | would end a cell, a line break (\n, \r, ...) the row
        return "| " + " | ".join(" ".join(format_value(cell).replace("|", r"\|").splitlines()) for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def markdown_table(rows: dict[str, Any], header: tuple[str, str] = ("", "")) -> str:
    return markdown_grid(list(header), [[key, value] for key, value in rows.items()])


def write_report(out_dir: Path, config, env_report: dict | None, summary: dict,
                 evaluations: tuple[str, ...] = ()) -> Path:
    """out_dir/report.md: the run's report card, with its plots next to it as PNG files. `evaluations` are
    Markdown sections (the CORE table, the chat evaluation table) placed after the results."""
    out_dir = Path(out_dir)
    metrics = read_logged_records(out_dir / METRICS_FILE)
    samples = read_logged_records(out_dir / SAMPLES_FILE)
    settings = config_dict(config)
    sections = [f"# nanochat-flyte report: {settings.get('run_name') or 'unnamed run'}",
                f"Generated {datetime.now():%Y-%m-%d %H:%M:%S} from `{METRICS_FILE}` and `{SAMPLES_FILE}`.",
                "## Results", markdown_table(headline_numbers(out_dir, summary)), *evaluations]
    for name, figure in run_figures(metrics).items():
        figure.savefig(out_dir / name)
        sections.append(f"![{Path(name).stem}]({name})")
    if samples:
        last_step = max(sample["step"] for sample in samples)
        sections.append(f"## Samples at step {last_step}")
        sections += [markdown_sample(sample["prompt"], sample["completion"])
                     for sample in samples if sample["step"] == last_step]
    sections += ["## Configuration", markdown_table(as_written(settings), ("field", "value"))]
    if env_report:
        sections += ["## Environment", markdown_table(as_written(env_report), ("", "value"))]
    report = out_dir / REPORT_FILE
    report.write_text("\n\n".join(sections) + "\n")
    return report


def write_run_report(checkpoint: str, report_dir: Path, config, env_report: dict | None, summary: dict,
                     evaluations: tuple[str, ...] = ()) -> Path:
    """The report card of a finished run, with its evaluations, in report_dir: built from the records of its
    checkpoint (a directory or fsspec URI), fetched without the weights."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    store, root = filesystem(str(checkpoint))
    for name in (METRICS_FILE, SAMPLES_FILE, RUN_INFO_FILE):
        if store.exists(f"{root.rstrip('/')}/{name}"):
            store.get_file(f"{root.rstrip('/')}/{name}", str(report_dir / name))
    return write_report(report_dir, config, env_report, summary, evaluations)


# ---------------------------------------------------------------------------- Flyte Deck HTML

DECK_STYLE = ("<style>table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
              "text-align:left;font-family:monospace}img{max-width:100%}</style>")


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_image(figure: Figure, alt: str) -> str:
    encoded = base64.b64encode(png_bytes(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"/>'


def training_deck_html(out_dir: Path, config, env_report: dict | None, summary: dict) -> str:
    """Self-contained HTML (plots inlined as base64 PNG): curves, samples, config and environment."""
    out_dir = Path(out_dir)
    metrics = read_logged_records(out_dir / METRICS_FILE)
    samples = read_logged_records(out_dir / SAMPLES_FILE)
    settings = config_dict(config)
    parts = [DECK_STYLE, f"<h2>Training: {html.escape(str(settings.get('run_name') or 'unnamed run'))}</h2>",
             html_table(["", "value"], list(headline_numbers(out_dir, summary).items()))]
    parts += [html_image(figure, Path(name).stem) for name, figure in run_figures(metrics).items()]
    parts += ["<h3>Samples</h3>",
              html_table(["step", "prompt", "completion"],
                         [[sample["step"], shown(sample["prompt"]), shown(sample["completion"])]
                          for sample in samples])]
    parts += ["<h3>Configuration</h3>", html_table(["field", "value"], list(as_written(settings).items()))]
    if env_report:
        parts += ["<h3>Environment</h3>", html_table(["", "value"], list(as_written(env_report).items()))]
    return "\n".join(parts)


def data_deck_html(manifest: dict) -> str:
    """Per-shard statistics of a prepared data directory (manifest.json); missing fields show as n/a."""
    tokenizer = manifest.get("tokenizer", {})
    header = ["split", "shard", "file", "documents", "characters", "tokens", "bytes / token", "download s",
              "tokenize s"]
    rows = []
    for split in ("train", "val"):
        for shard in manifest.get(split, []):
            tokens, documents, utf8_bytes = shard.get("tokens"), shard.get("documents"), shard.get("utf8_bytes")
            # text bytes per token, not counting the one <|endoftext|> per document (as the manifest does)
            text_tokens = tokens - (documents or 0) if tokens else None
            bytes_per_token = utf8_bytes / text_tokens if utf8_bytes and text_tokens else None
            rows.append([split, shard.get("shard"), shard.get("file"), documents, shard.get("characters"), tokens,
                         bytes_per_token, shard.get("download_seconds"), shard.get("tokenize_seconds")])
    overview = {"tokenizer": tokenizer.get("name"), "vocabulary size": tokenizer.get("vocab_size"),
                "validation bytes / token": tokenizer.get("val_bytes_per_token"),
                "train tokens": manifest.get("train_tokens"), "validation tokens": manifest.get("val_tokens")}
    return "\n".join([DECK_STYLE, "<h2>Data</h2>", html_table(["", "value"], list(overview.items())),
                      "<h3>Shards</h3>", html_table(header, rows)])


def environment_deck_html(env_report: dict) -> str:
    return "\n".join([DECK_STYLE, "<h2>Environment</h2>",
                      html_table(["", "value"], list(as_written(env_report).items()))])
