"""The CORE metric of the DCLM paper (arXiv 2406.11794), nanochat's headline score for base models.

    nanochat core-eval --checkpoint DIR_OR_URI [--bundle URL_OR_PATH] [--max-per-task N] \
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
The items are nanochat's: each task shuffled with a fixed seed, then cut to --max-per-task N; an item's few-shot
examples are drawn from that set by a generator seeded with its position in it. So every prompt is the one nanochat
builds for that item, and a subset's prompts are its own (a smaller N has other shots than a larger one).

Which tokens are the answer's: nanochat's rules, so that our scores compare with its published ones. BPE may merge
the first characters of the continuation with the end of the context, so the continuation is never tokenized on its
own; the spans come from the whole prompts' tokens:
- multiple choice: every token after those that all the item's prompts share from the left (the query, and any
  leading words that all choices share);
- schema: the tokens that all the item's prompts share from the right (the continuation, and any ending that all
  contexts share);
- language modeling: every token of the prompt after its longest common prefix with the prompt up to the
  delimiter, less the delimiter's trailing whitespace: the continuation's tokens with the space before them, not
  the delimiter's words (jeopardy's "\nAnswer: " scores " Paris" of "...\nAnswer: Paris").
A span keeps at least its last token (a choice that is a prefix of another would otherwise have none).

A task's accuracy is centered against its random baseline b (percent): (acc - b/100) / (1 - b/100), so 0 is
chance and 1 is perfect; CORE is the mean of the centered accuracies. GPT-2 XL (1.6B) scores about 0.2565.
Scoring is batched: the rows (one per choice or context option) of many items are sorted by length and run
through the model batch_size at a time, padded on the right (attention is causal: padding never changes the
scores of the tokens before it).
"""

import dataclasses
import html
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.bundle import Bundle, CoreTask
from nanochat_flyte.model.device import EvalBatches, Precision, rank_and_world_size, select_precision
from nanochat_flyte.reporting.report import html_table, markdown_grid, markdown_text

FEWSHOT_SEED = 1234  # + the item's position in the evaluated set: its shots, as nanochat draws them
SUBSET_SEED = 1337  # the shuffle of each task's items that --max-per-task takes its first N from, as nanochat's
CHUNK_ITEMS = 512  # items tokenized at a time: bounds memory; the next chunk is tokenized while this one runs


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

    def without_continuation(context: str) -> str:  # for language modeling (the module docstring says why)
        return (context + task.delimiter).rstrip()

    tokens = encode(tokenizer, [text for item in options for context, continuation in item
                                for text in ([without_continuation(context)] if language_modeling else [])
                                + [context + continuation]])
    rows = []
    for item in options:
        prompts = [tokens[context + continuation] for context, continuation in item]
        contexts = [tokens[without_continuation(context)] for context, _ in item] if language_modeling else []
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


def task_subset(task: CoreTask, max_per_task: int | None) -> CoreTask:
    """The task as it is evaluated: its items in a seeded shuffle, the first max_per_task of them (all with None),
    as nanochat's base_eval takes them. Few-shot examples come from this set, by position (render)."""
    examples = list(task.examples)
    random.Random(SUBSET_SEED).shuffle(examples)
    return dataclasses.replace(task, examples=tuple(examples[:max_per_task]))


def check_max_per_task(bundle: Bundle, max_per_task: int | None, field: str = "core_max_per_task",
                       owner: str = "RunConfig") -> None:
    """Each item's few-shot examples come from the other items evaluated (task_subset): every task needs more of
    them than it shows. One line naming owner.field, before anything is scored."""
    if not max_per_task:
        return
    task = max(bundle.tasks, key=lambda task: task.num_fewshot)
    if max_per_task <= task.num_fewshot:
        raise ConfigError(field, f"{max_per_task} items per task leave {task.label}'s {task.num_fewshot}-shot prompts "
                                 f"too few others to draw their examples from: give at least {task.num_fewshot + 1}, "
                                 "or 0 for every item", owner)


def centered(accuracy: float, chance: float) -> float:
    """0 at chance, 1 when perfect: CORE's and ChatCORE's scale."""
    return (accuracy - chance) / (1 - chance)


def score_core(model: nn.Module, tokenizer: tiktoken.Encoding, bundle: Bundle, *, max_per_task: int | None = None,
                  batch_size: int = 16, device: torch.device | None = None, precision: Precision | None = None
                  ) -> dict[str, Any]:
    """Score `model` (a GPT: model(inputs, logits_at=mask) gives the logits at the masked positions; not compiled:
    every batch has a new shape) on every task.

    device defaults to the model's, precision to select_precision(device) (bf16/fp16 autocast on GPU); prompts are
    cropped to the model's context. batch_size counts rows (one per choice) per forward pass. Under torch.distributed
    every rank must call this: each scores every world_size-th item and the counts are summed.
    Returns {"core_metric", "tasks": {label: {type, shots, examples (scored), items (the task's), accuracy, centered,
    seconds}}, "max_per_task", "seconds", "bundle"}.
    """
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1 (or None for every example), got {max_per_task}")
    check_max_per_task(bundle, max_per_task)
    batches = EvalBatches(batch_size, "CORE")  # shrinks if a batch does not fit on the GPU
    device = device or next(model.parameters()).device
    precision = precision or select_precision(device)
    context_len = model.config.sequence_len
    rank, world_size = rank_and_world_size()
    start = time.perf_counter()
    tasks: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for task in bundle.tasks:
            task_start = time.perf_counter()
            items = len(task.examples)
            task = task_subset(task, max_per_task)
            indices = list(range(len(task.examples)))
            correct = sum(score_task(model, tokenizer, task, indices[rank::world_size], batches=batches,
                                     context_len=context_len, device=device, precision=precision))
            if world_size > 1:
                counts = torch.tensor([correct], dtype=torch.int64, device=device)
                dist.all_reduce(counts)
                correct = counts.item()
            accuracy = correct / len(indices)
            tasks[task.label] = {"type": task.task_type, "shots": task.num_fewshot, "examples": len(indices),
                                 "items": items, "accuracy": accuracy,
                                 "centered": centered(accuracy, task.random_baseline / 100),
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


def core_notes(result: dict[str, Any], escape: Callable[[str], str]) -> list[str]:
    """What the table was scored on: the bundle (as `escape` writes it for Markdown or HTML), and a sample of each
    task where max_per_task cut them."""
    notes = [f"Bundle: {escape(result['bundle'])}"] if result.get("bundle") else []
    if any(task["examples"] < task.get("items", 0) for task in result["tasks"].values()):
        notes.append(f"At most {result['max_per_task']} items a task, a seeded sample of each: an estimate, not "
                     "comparable with a CORE score over every item.")
    return notes


def core_table_markdown(result: dict[str, Any]) -> str:
    """The report card's section (and `nanochat core-eval`'s output)."""
    return "\n\n".join(["## CORE", markdown_grid(*core_table(result)), *core_notes(result, markdown_text)])


def core_table_html(result: dict[str, Any]) -> str:
    """The CORE tab of a task's report card."""
    notes = "".join(f"<p>{note}</p>" for note in core_notes(result, html.escape))
    return "\n".join(["<h2>CORE</h2>", html_table(*core_table(result)), notes])


def core_log_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers to log (W&B, metrics.jsonl): core_metric and each task's centered accuracy."""
    return {"core_metric": result["core_metric"],
            **{f"core/{label}": task["centered"] for label, task in result["tasks"].items()}}
