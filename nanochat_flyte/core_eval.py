"""The CORE metric of the DCLM paper (arXiv 2406.11794), nanochat's headline score for base models.

    python -m nanochat_flyte.core_eval --checkpoint DIR_OR_URI [--bundle URL_OR_PATH] [--max-per-task N] \
        [--device auto] [--dtype auto] [--batch-size 16]

The eval bundle (a zip or an unpacked directory, local or at any URL) holds `core.yaml` (the tasks), `eval_data/`
(one JSONL file per dataset) and `eval_meta_data.csv` (each task's random baseline, in percent). Three task types:
- multiple_choice {query, choices, gold}: the answer is the choice whose tokens get the lowest MEAN loss after the
  query (a mean, so that long choices are not penalised for their length);
- schema {context_options, continuation, gold}: the answer is the context under which the shared continuation gets
  the lowest mean loss;
- language_modeling {context, continuation}: correct when greedy decoding reproduces every continuation token,
  i.e. when the argmax at every continuation position, fed the true tokens before it, is the true next token.
Each prompt is `num_fewshot` solved examples of the same task (never the item itself, chosen by a seeded RNG per
item), each followed by a blank line, then the item; context and answer are joined by the task's
`continuation_delimiter` (default one space). Like the training documents, every prompt starts with
<|endoftext|>. A prompt longer than the model's context loses tokens from the left (the oldest few-shot text).
--max-per-task N scores the first N items of a seeded shuffle of each task; their few-shot examples still come from
the whole task, so every item gets the same prompt as in a full run.

Which tokens are the answer's: nanochat's rules, so that our scores compare with its published ones. BPE may merge
the first characters of the continuation with the end of the context, so the continuation is never tokenized on its
own; the spans come from the whole prompts' tokens:
- multiple choice: every token after those that all the item's prompts share from the left (the query, and any
  leading words that all choices share);
- schema: the tokens that all the item's prompts share from the right (the continuation, and any ending that all
  contexts share);
- language modeling: every token of the prompt after its longest common prefix with the prompt without the
  continuation: exactly the tokens whose text depends on the continuation.
A span keeps at least its last token (a choice that is a prefix of another would otherwise have none).

A task's accuracy is centered against its random baseline b (percent): (acc - b/100) / (1 - b/100), so 0 is
chance and 1 is perfect; CORE is the mean of the centered accuracies. GPT-2 (124M) scores about 0.2565.
Scoring is batched: the rows (one per choice or context option) of many items are sorted by length and run
through the model batch_size at a time, padded on the right (attention is causal: padding never changes the
scores of the tokens before it).
"""

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

from nanochat_flyte.checkpoint import load_model
from nanochat_flyte.cli import ArgumentParser
from nanochat_flyte.config import EVAL_BUNDLE_URL, ConfigError, UserError
from nanochat_flyte.device import EvalBatches, Precision, select_device, select_precision
from nanochat_flyte.download import (CorruptFile, DownloadError, default_cache_dir, download_file, is_http, is_local,
                                     probe)
from nanochat_flyte.report import html_table, markdown_grid

CORE_YAML = "core.yaml"
DATA_DIR = "eval_data"
META_CSV = "eval_meta_data.csv"
TASK_COLUMN, BASELINE_COLUMN = "Eval Task", "Random baseline"
DEFAULT_DELIMITER = " "
FIELDS = {  # the fields each task type's examples need, and their JSON types
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}
OPTIONS_FIELD = {"multiple_choice": "choices", "schema": "context_options"}  # the list `gold` indexes
FEWSHOT_SEED = 1234  # + the item's index: an item's prompt is the same in every run and in every subset
SUBSET_SEED = 1337  # the shuffle --max-per-task takes its first N from: the same subset every time
CHUNK_ITEMS = 512  # items tokenized at a time: bounds memory; the next chunk is tokenized while this one runs


class BundleError(UserError, ValueError):
    """The eval bundle is not usable; the message names the file (and line or field) at fault."""


# ----------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # a key of FIELDS
    num_fewshot: int
    delimiter: str  # between context and continuation
    random_baseline: float  # percent
    examples: tuple[dict, ...]


@dataclass(frozen=True)
class Bundle:
    """A parsed, validated bundle: every example in memory, usable for any number of evaluations."""
    source: str
    tasks: tuple[CoreTask, ...]


def cache_name(source: str) -> str:
    """eval_bundle-<hash of the URL>: two sources with the same file name never share a cache entry."""
    stem = PurePosixPath(source.rstrip("/")).name.removesuffix(".zip") or "bundle"
    return f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def verify_zip(path: Path) -> None:
    """A readable zip: its central directory (at the very end of the file) lists the members. What is in it is
    checked after the download, as a BundleError: downloading again cannot fix a zip without core.yaml."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptFile(f"{path.name} is not a readable zip file: {e}") from e


def publish_directory(fill, target: Path) -> Path:
    """Fill a temporary folder beside target, then rename it into place: target exists only when complete."""
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    fill(temp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(temp, target)
    return target


def unpack(zip_path: Path, target: Path, fresh: bool) -> Path:
    """The zip unpacked at target, once: reused unless the zip was just downloaded (`fresh`)."""
    if target.is_dir() and not fresh:
        return target

    def extract(temp: Path) -> None:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(temp)  # zipfile drops absolute paths and ".." from member names
        except (zipfile.BadZipFile, OSError) as e:
            raise BundleError(f"{zip_path}: cannot be unpacked: {e}") from e

    return publish_directory(extract, target)


def fetch_bundle(source: str, cache_dir: Path | None = None) -> Path:
    """A local directory holding the bundle: the source itself (a local directory), or unpacked into the cache from
    a zip (local, http(s) or any fsspec URL, downloaded with retries) or from a remote directory (fsspec)."""
    cache_dir = Path(cache_dir or default_cache_dir("eval_bundle"))
    what = "the CORE eval bundle"
    if is_local(source):
        path = Path(fsspec.core.url_to_fs(source)[1])
        if path.is_dir():
            return path
    elif not is_http(source):
        try:
            filesystem, path = fsspec.core.url_to_fs(source)
            is_directory = filesystem.isdir(path)
        except (ImportError, OSError, ValueError) as e:  # ImportError: s3fs or gcsfs is not installed
            raise DownloadError(what, source, str(e)) from e
        if is_directory:
            target = cache_dir / cache_name(source)
            if target.is_dir():
                return target
            return publish_directory(lambda temp: filesystem.get(path.rstrip("/") + "/", str(temp), recursive=True),
                                     target)
    download = download_file(source, cache_dir / f"{cache_name(source)}.zip", verify_zip, what)
    return unpack(download.path, cache_dir / cache_name(source), fresh=download.bytes > 0)


def bundle_root(directory: Path) -> Path:
    """The folder holding core.yaml: the directory itself, or its one subfolder that does (eval_bundle/ in the
    official zip)."""
    if (directory / CORE_YAML).is_file():
        return directory
    nested = [child for child in sorted(directory.iterdir()) if (child / CORE_YAML).is_file()]
    if len(nested) != 1:
        found = f"in each of {', '.join(child.name for child in nested)}" if nested else "there or one folder down"
        raise BundleError(f"no single {CORE_YAML} in the bundle ({found})")
    return nested[0]


def load_bundle(source: str | Path = EVAL_BUNDLE_URL, cache_dir: Path | None = None) -> Bundle:
    """Fetch (see fetch_bundle), parse and validate a bundle. Every problem raises one BundleError naming the
    bundle, the file and the field or line, before any model runs."""
    try:
        return read_bundle(str(source), cache_dir)
    except BundleError as error:
        raise BundleError(f"eval bundle {source}: {error}") from None


def read_bundle(source: str, cache_dir: Path | None) -> Bundle:
    top = fetch_bundle(source, cache_dir)
    root = bundle_root(top)

    def name(path: Path) -> str:  # paths in messages: relative to the top of the bundle
        return path.relative_to(top).as_posix()

    tasks_file = root / CORE_YAML
    try:
        config = yaml.safe_load(tasks_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleError(f"{name(tasks_file)}: not valid YAML: {' '.join(str(e).split())}") from e
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{name(tasks_file)}: needs a non-empty list 'icl_tasks'")
    baselines = read_baselines(root / META_CSV, name)
    datasets: dict[str, tuple[dict, ...]] = {}  # hellaswag and hellaswag_zeroshot share one file
    tasks = []
    for position, entry in enumerate(entries):
        label = entry.get("label") if isinstance(entry, dict) else None
        where = f"{name(tasks_file)}: icl_tasks[{position}]" + (f" ({label})" if isinstance(label, str) else "")
        if not isinstance(label, str) or not label:
            raise BundleError(f"{where}: needs a 'label' (a non-empty string)")
        if any(task.label == label for task in tasks):
            raise BundleError(f"{where}: label '{label}' appears twice")
        task_type = entry.get("icl_task_type")
        if task_type not in FIELDS:
            raise BundleError(f"{where}: unknown icl_task_type {task_type!r}; expected one of {', '.join(FIELDS)}")
        num_fewshot = entry.get("num_fewshot")
        if isinstance(num_fewshot, list) and len(num_fewshot) == 1:  # the official core.yaml writes [10]
            num_fewshot = num_fewshot[0]
        if not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool) or num_fewshot < 0:
            raise BundleError(f"{where}: num_fewshot must be an integer >= 0 (or a list of one), got "
                              f"{entry.get('num_fewshot')!r}")
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        if not isinstance(delimiter, str):
            raise BundleError(f"{where}: continuation_delimiter must be a string, got {delimiter!r}")
        uri = entry.get("dataset_uri")
        if not isinstance(uri, str) or not uri:
            raise BundleError(f"{where}: needs a 'dataset_uri' (a path under {DATA_DIR}/)")
        data_file = root / DATA_DIR / uri
        if not data_file.is_file():
            raise BundleError(f"{where}: dataset_uri '{uri}': no such file {name(data_file)}")
        if label not in baselines:
            raise BundleError(f"{name(root / META_CSV)}: no '{BASELINE_COLUMN}' row for task '{label}' "
                              f"(column '{TASK_COLUMN}')")
        baseline = parse_baseline(label, *baselines[label], name(root / META_CSV))
        key = f"{task_type} {uri}"
        if key not in datasets:
            datasets[key] = read_examples(data_file, name(data_file), task_type)
        examples = datasets[key]
        if len(examples) <= num_fewshot:
            raise BundleError(f"{where}: num_fewshot {num_fewshot} needs at least {num_fewshot + 1} examples; "
                              f"{name(data_file)} has {len(examples)}")
        if not delimiter:
            check_continuations(examples, task_type, name(data_file))
        tasks.append(CoreTask(label, task_type, num_fewshot, delimiter, baseline, examples))
    return Bundle(source, tuple(tasks))


def read_baselines(path: Path, name) -> dict[str, tuple[int, str]]:
    """Task label -> (line, random baseline as written) from eval_meta_data.csv; other columns are ignored, and only
    the rows of the tasks in core.yaml are checked (the file lists more tasks than CORE uses)."""
    if not path.is_file():
        raise BundleError(f"{name(path)}: missing (it holds every task's '{BASELINE_COLUMN}')")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        missing = [column for column in (TASK_COLUMN, BASELINE_COLUMN) if column not in (reader.fieldnames or [])]
        if missing:
            raise BundleError(f"{name(path)}: no column '{missing[0]}' (columns: {reader.fieldnames})")
        return {row[TASK_COLUMN]: (reader.line_num, row[BASELINE_COLUMN]) for row in reader}


def parse_baseline(label: str, line: int, value: str, where: str) -> float:
    try:
        baseline = float(value)
    except (TypeError, ValueError):
        baseline = float("nan")
    if not 0 <= baseline < 100:  # 100 would divide by zero when centering
        raise BundleError(f"{where} line {line}: '{BASELINE_COLUMN}' of '{label}' must be a number in [0, 100), "
                          f"got {value!r}")
    return baseline


def read_examples(path: Path, name: str, task_type: str) -> tuple[dict, ...]:
    """Every example of a JSONL file, each checked for the fields its task type needs."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{name} line {line_number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise BundleError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(example, dict):
                raise BundleError(f"{where}: not a JSON object")
            check_example(example, task_type, where)
            examples.append(example)
    if not examples:
        raise BundleError(f"{name}: no examples")
    return tuple(examples)


def check_example(example: dict, task_type: str, where: str) -> None:
    for field, kind in FIELDS[task_type].items():
        if field not in example:
            raise BundleError(f"{where}: missing field '{field}'")
        value = example[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{where}: field '{field}' must be a {kind.__name__} ({type(value).__name__} found)")
    options_field = OPTIONS_FIELD.get(task_type)
    if options_field:
        options = example[options_field]
        if not options or not all(isinstance(option, str) for option in options):
            raise BundleError(f"{where}: field '{options_field}' must be a non-empty list of strings")
        if not 0 <= example["gold"] < len(options):
            raise BundleError(f"{where}: field 'gold' is {example['gold']}, not an index into the "
                              f"{len(options)} '{options_field}'")


def check_continuations(examples: tuple[dict, ...], task_type: str, name: str) -> None:
    """Without a delimiter, an empty continuation would leave no token to score."""
    for number, example in enumerate(examples, start=1):
        continuations = example["choices"] if task_type == "multiple_choice" else [example["continuation"]]
        if "" in continuations:
            raise BundleError(f"{name} example {number}: an empty continuation and no continuation_delimiter: "
                              "nothing to score")


def check_bundle_url(url: str) -> None:
    """Fail fast, before any download or GPU time, unless url points at something that can be a bundle: an
    existing local zip or directory (with core.yaml), or a URL that answers. Raises one ConfigError."""
    if not url:
        raise ConfigError("eval_bundle_url", "must not be empty")
    if is_local(url):
        path = Path(fsspec.core.url_to_fs(url)[1])
        if path.is_dir():
            try:
                bundle_root(path)
            except BundleError as e:
                raise ConfigError("eval_bundle_url", f"{url!r}: {e}") from e
        elif not path.is_file():
            raise ConfigError("eval_bundle_url", f"{url!r}: not found")
        elif not zipfile.is_zipfile(path):
            raise ConfigError("eval_bundle_url", f"{url!r} is not a zip file (eval_bundle.zip) or a bundle directory")
        return
    answer = probe(url)
    if answer is not None:
        raise ConfigError("eval_bundle_url", f"{url!r} is unreachable: {answer}")


# ----------------------------------------------------------------------------- prompts and tokens


def fewshot_indices(num_examples: int, index: int, num_fewshot: int) -> list[int]:
    """num_fewshot distinct examples other than `index`, the same for this item in every run."""
    picks = random.Random(FEWSHOT_SEED + index).sample(range(num_examples - 1), num_fewshot)
    return [pick + (pick >= index) for pick in picks]  # 0..n-2 -> 0..n-1 without index


def render(task: CoreTask, index: int) -> list[tuple[str, str]]:
    """(context, continuation) of each answer option of item `index`: the prompt is context + continuation, and
    the continuation starts with the delimiter."""
    item, delimiter = task.examples[index], task.delimiter
    shots = [task.examples[i] for i in fewshot_indices(len(task.examples), index, task.num_fewshot)]
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{shot['query']}{delimiter}{shot['choices'][shot['gold']]}\n\n" for shot in shots)
        return [(prefix + item["query"], delimiter + choice) for choice in item["choices"]]
    if task.task_type == "schema":
        prefix = "".join(f"{shot['context_options'][shot['gold']]}{delimiter}{shot['continuation']}\n\n"
                         for shot in shots)
        return [(prefix + context, delimiter + item["continuation"]) for context in item["context_options"]]
    # language modeling: contexts are stripped (some datasets store them with trailing whitespace)
    prefix = "".join(f"{shot['context'].strip()}{delimiter}{shot['continuation']}\n\n" for shot in shots)
    return [(prefix + item["context"].strip(), delimiter + item["continuation"])]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Binary search on prefix equality: list slices compare in C, a Python loop over 500 tokens would not."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low] holds throughout
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def batched(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class Row:
    """One sequence to score: the prompt's tokens; the answer span is tokens[start:]."""
    tokens: list[int]
    start: int


def encode(tokenizer: tiktoken.Encoding, texts: list[str]) -> dict[str, list[int]]:
    """Each distinct text's tokens after <|endoftext|> (training documents start with it), in one parallel batch
    (tiktoken releases the GIL)."""
    texts = list(dict.fromkeys(texts))
    encoded = tokenizer.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    return {text: [tokenizer.eot_token] + tokens for text, tokens in zip(texts, encoded)}


def answer_starts(task_type: str, prompts: list[list[int]], contexts: list[list[int]]) -> list[int]:
    """Where each prompt's answer span starts (the rules are in the module docstring); contexts, the prompts
    without their continuation, are needed for language modeling only."""
    if task_type == "multiple_choice":
        shared = min(common_prefix_length(prompts[0], prompt) for prompt in prompts)
        starts = [shared] * len(prompts)
    elif task_type == "schema":
        shared = min(common_prefix_length(prompts[0][::-1], prompt[::-1]) for prompt in prompts)
        starts = [len(prompt) - shared for prompt in prompts]
    else:
        starts = [common_prefix_length(context, prompt) for context, prompt in zip(contexts, prompts)]
    # at least the last token; never the first (nothing predicts it)
    return [max(1, min(start, len(prompt) - 1)) for start, prompt in zip(starts, prompts)]


def cropped(tokens: list[int], start: int, context_len: int) -> Row:
    """A prompt longer than the model's context loses its oldest tokens. An answer longer than the whole context
    keeps only its last tokens, after a first one that only predicts."""
    crop = max(0, len(tokens) - context_len)
    return Row(tokens[crop:], max(1, start - crop))


# ----------------------------------------------------------------------------- scoring


@torch.inference_mode()
def score_rows(model: nn.Module, rows: list[Row], *, batches: EvalBatches, pad_token: int, device: torch.device,
               precision: Precision) -> tuple[list[float], list[bool]]:
    """For each row: the mean loss (nats) of its answer tokens, and whether the argmax predicted every one."""

    def score(batch: list[int]) -> list[tuple[float, bool]]:
        lengths = [len(rows[r].tokens) for r in batch]
        inputs = torch.full((len(batch), lengths[0]), pad_token, dtype=torch.long)
        for i, r in enumerate(batch):
            inputs[i, :lengths[i]] = torch.tensor(rows[r].tokens)
        inputs = inputs.to(device)
        # position p predicts token p + 1: the answer tokens start..length-1 are predicted at start-1..length-2
        positions = torch.arange(lengths[0], device=device)
        starts = torch.tensor([rows[r].start for r in batch], device=device)
        ends = torch.tensor(lengths, device=device)
        in_span = (positions >= starts[:, None] - 1) & (positions < ends[:, None] - 1)
        with precision.autocast():
            span_logits = model(inputs, logits_at=in_span)  # (answer tokens in the batch, vocab)
        targets = inputs[:, 1:][in_span[:, :-1]]  # the last position predicts nothing: never in a span
        losses = F.cross_entropy(span_logits, targets, reduction="none")
        misses = (span_logits.argmax(dim=-1) != targets).float()
        which_row = in_span.nonzero()[:, 0]
        loss_sums = torch.zeros(len(batch), device=device).index_add_(0, which_row, losses)
        miss_counts = torch.zeros(len(batch), device=device).index_add_(0, which_row, misses)
        mean_losses = (loss_sums / in_span.sum(dim=1)).tolist()
        return [(loss, missed == 0) for loss, missed in zip(mean_losses, miss_counts.tolist())]

    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens), reverse=True)  # longest (OOM) first
    scores = [None] * len(rows)
    for r, row_score in zip(order, batches.map(order, score)):
        scores[r] = row_score
    return [loss for loss, _ in scores], [exact for _, exact in scores]


def is_correct(task: CoreTask, index: int, scores: list[tuple[float, bool]]) -> bool:
    """scores: (mean loss, every token predicted) of each answer option of item `index`."""
    if task.task_type == "language_modeling":
        return scores[0][1]
    best = min(range(len(scores)), key=lambda option: scores[option][0])  # the first of equal losses
    return best == task.examples[index]["gold"]


def item_rows(tokenizer: tiktoken.Encoding, task: CoreTask, indices: list[int], context_len: int) -> list[list[Row]]:
    """The rows of each item (one per answer option), tokenized in one batch."""
    options = [render(task, index) for index in indices]
    language_modeling = task.task_type == "language_modeling"
    tokens = encode(tokenizer, [text for item in options for context, continuation in item
                                for text in ([context] if language_modeling else []) + [context + continuation]])
    rows = []
    for item in options:
        prompts = [tokens[context + continuation] for context, continuation in item]
        contexts = [tokens[context] for context, _ in item] if language_modeling else []
        starts = answer_starts(task.task_type, prompts, contexts)
        rows.append([cropped(prompt, start, context_len) for prompt, start in zip(prompts, starts)])
    return rows


def score_task(model: nn.Module, tokenizer: tiktoken.Encoding, task: CoreTask, indices: list[int], *,
               batches: EvalBatches, context_len: int, device: torch.device, precision: Precision) -> list[bool]:
    """Whether the model answers each item of `indices` correctly. While the model scores one chunk of items, a
    thread tokenizes the next."""
    results: list[bool] = []
    chunks = batched(indices, CHUNK_ITEMS)
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(item_rows, tokenizer, task, chunks[0], context_len) if chunks else None
        for number, chunk in enumerate(chunks):
            rows_per_item = upcoming.result()
            if number + 1 < len(chunks):
                upcoming = pool.submit(item_rows, tokenizer, task, chunks[number + 1], context_len)
            rows = [row for item in rows_per_item for row in item]
            scores = iter(zip(*score_rows(model, rows, batches=batches, pad_token=tokenizer.eot_token,
                                          device=device, precision=precision)))
            results += [is_correct(task, index, [next(scores) for _ in item])
                        for index, item in zip(chunk, rows_per_item)]
    return results


def task_subset(task: CoreTask, max_per_task: int | None) -> list[int]:
    """The items to evaluate: all, or the first max_per_task of a seeded shuffle (so a larger N extends a smaller
    one), in file order."""
    indices = list(range(len(task.examples)))
    if max_per_task is None or max_per_task >= len(indices):
        return indices
    random.Random(SUBSET_SEED).shuffle(indices)
    return sorted(indices[:max_per_task])


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 when perfect; random_baseline is in percent, as eval_meta_data.csv gives it."""
    chance = random_baseline / 100
    return (accuracy - chance) / (1 - chance)


def evaluate_core(model: nn.Module, tokenizer: tiktoken.Encoding, bundle: Bundle, *, max_per_task: int | None = None,
                  batch_size: int = 16, device: torch.device | None = None, precision: Precision | None = None,
                  context_len: int | None = None) -> dict[str, Any]:
    """Score `model` (model(idx) -> logits (B, T, vocab); not compiled: every batch has a new shape) on every task.

    device defaults to the model's, precision to select_precision(device) (bf16/fp16 autocast on GPU), context_len
    to model.config.sequence_len. batch_size counts rows (one per choice) per forward pass. Under torch.distributed
    every rank must call this: each scores every world_size-th item and the counts are summed.
    Returns {"core_metric", "tasks": {label: {type, shots, examples, accuracy, centered, seconds}}, "max_per_task",
    "seconds", "bundle"}.
    """
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1 (or None for every example), got {max_per_task}")
    batches = EvalBatches(batch_size, "CORE")  # shrinks if a batch does not fit on the GPU
    device = device or next(model.parameters()).device
    precision = precision or select_precision(device)
    context_len = context_len or model.config.sequence_len
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2 (a token, then one to predict), got {context_len}")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start = time.perf_counter()
    tasks: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for task in bundle.tasks:
            task_start = time.perf_counter()
            indices = task_subset(task, max_per_task)
            correct = sum(score_task(model, tokenizer, task, indices[rank::world_size], batches=batches,
                                     context_len=context_len, device=device, precision=precision))
            if world_size > 1:
                counts = torch.tensor([correct], dtype=torch.int64, device=device)
                dist.all_reduce(counts)
                correct = counts.item()
            accuracy = correct / len(indices)
            tasks[task.label] = {"type": task.task_type, "shots": task.num_fewshot, "examples": len(indices),
                                 "accuracy": accuracy, "centered": centered_accuracy(accuracy, task.random_baseline),
                                 "seconds": time.perf_counter() - task_start}
            if rank == 0:
                print(f"core: {task.label} ({task.num_fewshot}-shot {task.task_type}, {len(indices)} examples): "
                      f"accuracy {accuracy:.4f}, centered {tasks[task.label]['centered']:.4f}, "
                      f"{tasks[task.label]['seconds']:.1f}s", flush=True)
    finally:
        model.train(was_training)
    core_metric = sum(task["centered"] for task in tasks.values()) / len(tasks)
    return {"core_metric": core_metric, "tasks": tasks, "max_per_task": max_per_task,
            "seconds": time.perf_counter() - start, "bundle": bundle.source}


# ----------------------------------------------------------------------------- reporting


def core_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the per-task table, with CORE as the last row: for report.markdown_grid / html_table."""
    header = ["task", "type", "shots", "examples", "accuracy", "centered"]
    rows = [[label, task["type"], task["shots"], task["examples"], task["accuracy"], task["centered"]]
            for label, task in result["tasks"].items()]
    total = sum(task["examples"] for task in result["tasks"].values())
    return header, rows + [["CORE", "", "", total, "", result["core_metric"]]]


def core_table_markdown(result: dict[str, Any]) -> str:
    return markdown_grid(*core_table(result))


def core_table_html(result: dict[str, Any]) -> str:
    return html_table(*core_table(result))


def core_log_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers to log (W&B, metrics.jsonl): core_metric and each task's centered accuracy."""
    return {"core_metric": result["core_metric"],
            **{f"core/{label}": task["centered"] for label, task in result["tasks"].items()}}


# ----------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser("nanochat_flyte.core_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or fsspec URI (s3://, gs://, ...)")
    parser.add_argument("--bundle", default=EVAL_BUNDLE_URL, help="eval bundle: zip or directory, path or URL")
    parser.add_argument("--max-per-task", type=positive_int, help="evaluate a fixed, seeded subset of each task")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows (choices) per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    device = select_device(args.device)
    precision = select_precision(device, args.dtype)
    bundle = load_bundle(args.bundle)  # a bad bundle fails before a large checkpoint is loaded
    loaded = load_model(args.checkpoint, device)
    result = evaluate_core(loaded.model, loaded.tokenizer, bundle, max_per_task=args.max_per_task,
                           batch_size=args.batch_size, device=device, precision=precision)
    print(core_table_markdown(result))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from nanochat_flyte.cli import run

    run(main)
