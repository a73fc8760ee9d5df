"""CORE eval bundles in the exact upstream format, for tests, the benchmark and workflow tests.

- `write_bundle(directory, tasks, examples)`: core.yaml, eval_meta_data.csv and eval_data/*.jsonl exactly as given.
- `write_core_bundle(directory, examples_per_task, seed)`: a generated bundle with all three task types, few-shot
  and zero-shot tasks (two of them sharing a dataset file, like hellaswag and hellaswag_zeroshot) and a custom
  continuation delimiter ("\\nAnswer: ", like jeopardy's).
- `zip_directory(directory, zip_path)`: the official layout, every file under a top-level eval_bundle/ folder.
"""

import csv
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.shard_server import WORDS


@dataclass(frozen=True)
class TaskSpec:
    label: str
    task_type: str  # multiple_choice, schema or language_modeling
    num_fewshot: int
    dataset: str  # path under eval_data/
    delimiter: str | None = None  # None: no continuation_delimiter key (the default, one space)
    random_baseline: float = 0.0  # percent


def generated_tasks(shots: int) -> tuple[TaskSpec, ...]:
    """Every task type; few-shot (`shots`) and zero-shot; two tasks on one dataset; a custom delimiter."""
    return (
        TaskSpec("mc_fewshot", "multiple_choice", shots, "reasoning/choices.jsonl", random_baseline=25.0),
        TaskSpec("mc_zeroshot", "multiple_choice", 0, "reasoning/choices.jsonl", random_baseline=25.0),
        TaskSpec("schema_fewshot", "schema", shots, "commonsense/schema.jsonl", random_baseline=50.0),
        TaskSpec("lm_zeroshot", "language_modeling", 0, "language/completion.jsonl"),
        TaskSpec("qa_answer", "language_modeling", shots, "knowledge/qa.jsonl", delimiter="\nAnswer: "),
    )


TEST_TASKS = generated_tasks(shots=3)
NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo"]


def write_bundle(directory: Path, tasks: list[TaskSpec] | tuple[TaskSpec, ...],
                 examples: dict[str, list[dict]]) -> Path:
    """Write a bundle into directory (core.yaml at its top); examples maps each dataset path to its items."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for task in tasks:
        entry = {"label": task.label, "dataset_uri": task.dataset, "num_fewshot": [task.num_fewshot],
                 "icl_task_type": task.task_type}
        if task.delimiter is not None:
            entry["continuation_delimiter"] = task.delimiter
        entries.append(entry)
    (directory / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    for dataset, items in examples.items():
        path = directory / "eval_data" / dataset
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    with open(directory / "eval_meta_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Random baseline", "Description"])
        for task in tasks:
            writer.writerow([task.label, task.task_type, task.random_baseline, f"generated {task.task_type} task"])
    return directory


def sentence(rng: random.Random, words: tuple[int, int]) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(*words))).capitalize()


def generated_examples(task_type: str, count: int, rng: random.Random, words: tuple[int, int]) -> list[dict]:
    """count items of a task type; `words` bounds each sentence's length (the benchmark makes them longer)."""
    if task_type == "multiple_choice":
        return [{"query": f"Question: {sentence(rng, words)}?\nAnswer:", "gold": rng.randrange(4),
                 "choices": [sentence(rng, words) + "." for _ in range(4)]} for _ in range(count)]
    if task_type == "schema":
        items = []
        for _ in range(count):
            first, second = rng.sample(NAMES, 2)
            start = sentence(rng, words)
            items.append({"context_options": [f"{start}, so {first}", f"{start}, so {second}"],
                          "continuation": f"{sentence(rng, (3, 8)).lower()}.", "gold": rng.randrange(2)})
        return items
    return [{"context": sentence(rng, words) + " ", "continuation": rng.choice(WORDS)} for _ in range(count)]


def write_core_bundle(directory: Path, examples_per_task: int = 12, seed: int = 0,
                      tasks: tuple[TaskSpec, ...] = TEST_TASKS, words: tuple[int, int] = (4, 12)) -> Path:
    """A generated bundle of `tasks` in directory (core.yaml at its top)."""
    rng = random.Random(seed)
    examples: dict[str, list[dict]] = {}
    for task in tasks:
        if task.dataset not in examples:
            examples[task.dataset] = generated_examples(task.task_type, examples_per_task, rng, words)
    return write_bundle(directory, tasks, examples)


def zip_directory(directory: Path, zip_path: Path, prefix: str = "eval_bundle/") -> Path:
    """Zip every file of directory under `prefix`, as the official eval_bundle.zip is laid out."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(directory).as_posix())
    return zip_path
