"""The chat stage's data: hub datasets turned into training conversations (the SFT mixture) and evaluation items.

Training (nanochat's recipe; each source's epochs in ChatConfig):
- SmolTalk (HuggingFaceTB/smol-smoltalk): general conversations, as they are. A row that breaks the chat rules
  (conversation.normalize) is skipped and counted.
- MMLU auxiliary_train (cais/mmlu, all): multiple choice; the assistant answers with the letter alone.
- GSM8K (openai/gsm8k, main): grade-school math; the assistant writes the worked solution ending in `#### N`,
  with its calculations as calls to the calculator tool (calculator.py).
Evaluation: ARC-Easy, ARC-Challenge (allenai/ai2_arc), MMLU test, GSM8K test, HumanEval (openai/openai_humaneval).
RL (training/rl.py): GSM8K train problems to learn from, GSM8K test problems to validate on, as evaluation items.

Every line this module writes is one JSON object:
- a conversation: {"messages": [{"role", "content"}, ...], "source": "smoltalk" | "mmlu" | "gsm8k"}; GSM8K's
  assistant content is a list of parts (conversation.py)
- an evaluation item, by kind:
  categorical (arc_easy, arc_challenge, mmlu): {"task", "id", "messages": [user], "letters", "answer"} (+ "subject")
  gsm8k: {"task", "id", "messages": [user], "answer": "18"} (the reference number, commas removed)
  humaneval: {"task", "id", "messages": [user], "prompt", "test", "entry_point", "canonical_solution"}

    prepare_sft_data(config, out_dir)   -> out_dir/train.jsonl, val.jsonl, manifest.json
    prepare_eval_data(tasks, out_dir)   -> out_dir/<task>.jsonl, manifest.json
    prepare_rl_data(config, out_dir)    -> out_dir/train.jsonl, val.jsonl, manifest.json
All three run on a CPU before any GPU starts; the downloads are cached (hub.py), the outputs written atomically.
"""

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from nanochat_flyte.config import CHAT_EVAL_TASKS, ChatConfig, RLConfig
from nanochat_flyte.data import MANIFEST_FILE
from nanochat_flyte.data.conversation import ConversationError, calculator_parts, normalize
from nanochat_flyte.data.download import DownloadError, Retry
from nanochat_flyte.data.hub import (
    cached_listing,
    download_split,
    file_records,
    hub_endpoint,
    iter_rows,
    listing_url,
    parquet_urls,
    split_cache_dir,
    split_rows,
)
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.files import write_bytes_atomically

LETTERS = "ABCDEFGHIJ"
PROBE_RETRY = Retry(attempts=2, backoff_base_s=1.0)  # the endpoint check fails within seconds, not minutes


class BadRow(ValueError):
    """A dataset row that cannot become a conversation or an item: skipped, and counted in the manifest."""

# ----------------------------------------------------------------------------- multiple choice


def render_multiple_choice(question: str, choices: list[str], letters: list[str]) -> str:
    """The user's message for a multiple choice question. Each letter follows its choice, in parentheses: the
    letter then binds to the text just read (small models answer better so), and "(" and ")" keep it a token of
    its own, without a leading space, in both GPT-2's and our BPE's split patterns: the very token the assistant
    answers with."""
    lines = [f"Multiple choice question: {question}", "", "Choices:"]
    lines += [f"- {choice} ({letter})" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


def multiple_choice(question: str, choices: list[str], answer: int) -> tuple[str, list[str], str]:
    """(user message, letters, answer letter) of a question whose `answer` is the index of the right choice."""
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
        raise BadRow(f"answer {answer} of {len(choices)} choices")
    if not all(isinstance(text, str) for text in (question, *choices)):  # a mirror's null would read "None"
        raise BadRow("a question or choice that is not text")
    letters = list(LETTERS[:len(choices)])
    return render_multiple_choice(question, choices, letters), letters, letters[answer]


def mmlu_question(row: dict) -> tuple[str, list[str], str]:
    return multiple_choice(row["question"], row["choices"], row["answer"])


def arc_question(row: dict) -> tuple[str, list[str], str]:
    # Most ARC questions are labelled A-E, some 1-5: both become A-E by position, the letters the model learns
    labels = row["choices"]["label"]
    if row["answerKey"] not in labels:
        raise BadRow(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return multiple_choice(row["question"], row["choices"]["text"], labels.index(row["answerKey"]))


# ----------------------------------------------------------------------------- GSM8K

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def gsm8k_final_answer(solution: str) -> str:
    """The number after `####`, commas removed: "#### 1,200" -> "1200", "#### -3" -> "-3"."""
    match = FINAL_ANSWER.search(solution)
    if not match:
        raise BadRow("no final answer '#### N'")
    return match.group(1).replace(",", "")

# ----------------------------------------------------------------------------- rows -> training conversations


def smoltalk_conversation(row: dict, index: int) -> dict:
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise BadRow("messages: must be a list of messages")
    return {"messages": [{"role": m.get("role"), "content": m.get("content")} for m in messages], "source": "smoltalk"}


def mmlu_conversation(row: dict, index: int) -> dict:
    question, _, answer = mmlu_question(row)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "source": "mmlu"}


def gsm8k_conversation(row: dict, index: int) -> dict:
    gsm8k_final_answer(row["answer"])  # a solution without its final answer teaches the wrong ending
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": calculator_parts(row["answer"])}],
            "source": "gsm8k"}

# ----------------------------------------------------------------------------- rows -> evaluation items


def categorical_item(task: str, question: Callable[[dict], tuple[str, list[str], str]], row: dict,
                     index: int) -> dict:
    content, letters, answer = question(row)
    item = {"task": task, "id": row.get("id") or f"{task}/{index}", "messages": [{"role": "user", "content": content}],
            "letters": letters, "answer": answer}
    if "subject" in row:
        item["subject"] = row["subject"]
    return item


def gsm8k_item(row: dict, index: int, id_prefix: str = "gsm8k") -> dict:
    return {"task": "gsm8k", "id": f"{id_prefix}/{index}", "messages": [{"role": "user", "content": row["question"]}],
            "answer": gsm8k_final_answer(row["answer"])}


def humaneval_item(row: dict, index: int) -> dict:
    if not all(isinstance(row[field], str) for field in ("prompt", "test", "entry_point", "canonical_solution")):
        raise BadRow("a prompt, test, entry point or solution that is not text")  # the program is made of them
    return {"task": "humaneval", "id": row["task_id"], "messages": [{"role": "user", "content": row["prompt"]}],
            "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
            "canonical_solution": row["canonical_solution"]}

# ----------------------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    repo: str
    subset: str
    split: str
    columns: tuple[str, ...]  # read from the parquet files; a file without them fails its download check
    convert: Callable[[dict, int], dict]  # (row, row index) -> conversation or item; BadRow to skip the row


SMOLTALK_COLUMNS = ("messages",)
MMLU_COLUMNS = ("question", "choices", "answer")
GSM8K_COLUMNS = ("question", "answer")
ARC_COLUMNS = ("id", "question", "choices", "answerKey")

# name -> (source, the ChatConfig field with its epochs)
SFT_SOURCES = {
    "smoltalk": (Source("HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_COLUMNS, smoltalk_conversation),
                 "smoltalk_epochs"),
    "mmlu": (Source("cais/mmlu", "all", "auxiliary_train", MMLU_COLUMNS, mmlu_conversation), "mmlu_epochs"),
    "gsm8k": (Source("openai/gsm8k", "main", "train", GSM8K_COLUMNS, gsm8k_conversation), "gsm8k_epochs"),
}
VAL_SOURCE = Source("HuggingFaceTB/smol-smoltalk", "default", "test", SMOLTALK_COLUMNS, smoltalk_conversation)

EVAL_SOURCES = {
    "arc_easy": Source("allenai/ai2_arc", "ARC-Easy", "test", ARC_COLUMNS,
                       partial(categorical_item, "arc_easy", arc_question)),
    "arc_challenge": Source("allenai/ai2_arc", "ARC-Challenge", "test", ARC_COLUMNS,
                            partial(categorical_item, "arc_challenge", arc_question)),
    "mmlu": Source("cais/mmlu", "all", "test", (*MMLU_COLUMNS, "subject"),
                   partial(categorical_item, "mmlu", mmlu_question)),
    "gsm8k": Source("openai/gsm8k", "main", "test", GSM8K_COLUMNS, gsm8k_item),
    "humaneval": Source("openai/openai_humaneval", "openai_humaneval", "test",
                        ("task_id", "prompt", "canonical_solution", "test", "entry_point"), humaneval_item),
}
assert tuple(EVAL_SOURCES) == CHAT_EVAL_TASKS, "config.CHAT_EVAL_TASKS names the tasks this module provides"
# RL's problems: GSM8K's training split as evaluation items (the reward checks the final number)
RL_SOURCE = Source("openai/gsm8k", "main", "train", GSM8K_COLUMNS, partial(gsm8k_item, id_prefix="gsm8k_train"))


def renderable(converted: dict) -> dict:
    """A converted row (a conversation, or an item: a prompt awaiting the assistant) whose messages render: a mirror's
    null or number in a message is a skipped row here, not an error that stops training or an evaluation later."""
    try:
        normalize(converted["messages"], ends_with="user" if "task" in converted else "assistant")
    except ConversationError as e:
        raise BadRow(str(e)) from e
    return converted


def convert_split(source: Source, endpoint: str = "", cache_dir: Path | None = None) -> tuple[list[bytes], dict]:
    """Download the source's split (cached) and convert every row: (one JSON line per good row, the record for a
    manifest: where the rows came from, how many there were and how many were skipped, and why). The lines are
    UTF-8 bytes: half the memory of str for text with a single character beyond Latin-1 (SmolTalk's ~1.9 GB)."""
    paths = download_split(source.repo, source.subset, source.split, endpoint, cache_dir, source.columns)
    lines, skipped, rows = [], Counter(), 0
    for index, row in enumerate(iter_rows(paths, source.columns)):
        rows += 1
        try:
            lines.append(json.dumps(renderable(source.convert(row, index)), ensure_ascii=False).encode() + b"\n")
        except BadRow as e:
            skipped[str(e)] += 1
        except (TypeError, KeyError, AttributeError) as e:  # a field null or of another type (a mirror's row)
            skipped[f"a field is missing or of the wrong type ({type(e).__name__}: {e})"] += 1
    record = {"repo": source.repo, "subset": source.subset, "split": source.split, "rows": rows,
              "skipped": sum(skipped.values()), "skip_reasons": dict(skipped.most_common(5)),
              "files": file_records(paths)}
    return lines, record


def check_tasks(tasks: list[str]) -> None:
    for task in tasks:
        if task not in EVAL_SOURCES:
            raise ConfigError("eval_tasks", f"unknown task {task!r}; choose from {', '.join(EVAL_SOURCES)}",
                              "ChatConfig")


def probe_eval_sources(tasks: list[str], endpoint: str = "", cache_dir: Path | None = None) -> None:
    """Before a first download of the tasks' items: the hub answers a listing within PROBE_RETRY's two tries, or a
    DownloadError says so in seconds (a download tries six times, backing off). Tasks listed before ask nothing."""
    for task in tasks:
        source = EVAL_SOURCES[task]
        directory = split_cache_dir(source.repo, source.subset, source.split, cache_dir, endpoint)
        if cached_listing(directory, listing_url(source.repo, source.subset, source.split, endpoint)) is None:
            parquet_urls(source.repo, source.subset, source.split, endpoint, PROBE_RETRY)
            return


def load_eval_items(task: str, endpoint: str = "", cache_dir: Path | None = None) -> list[dict]:
    """The evaluation items of `task` (see EVAL_SOURCES), downloaded (cached) and converted, in dataset order."""
    check_tasks([task])
    lines, _ = convert_split(EVAL_SOURCES[task], endpoint, cache_dir)
    return [json.loads(line) for line in lines]


# what tells each stage's prepared data apart: a key only its manifest has
PREPARED_DATA = {"chat_sft": ("train_conversations", "SFT conversations"), "chat_rl": ("max_problems", "RL problems")}


def prepared_manifest(data_dir: Path, stage: str) -> dict:
    """The manifest of a folder of `stage`'s prepared data ("chat_sft" or "chat_rl"); one line when it is not one."""
    key, what = PREPARED_DATA[stage]
    path = Path(data_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if key not in manifest:
        raise ConfigError("data_dir", f"{data_dir} holds no prepared {what} (without data_dir, the stage prepares "
                                      "them from the hub)", stage)
    return manifest


def check_prepared_for(config: ChatConfig | RLConfig, manifest: dict, data_dir: Path) -> None:
    """Data prepared before (a --data-dir) is what `config` asks for: the run trains on that data, and its records
    name the config's settings. The settings a manifest records: the seed, the SFT sources' epochs,
    max_conversations and val_conversations (as many as the split held, at most), RL's max_problems and
    eval_problems."""
    if isinstance(config, RLConfig):
        saved = {field: manifest.get(field) for field in ("seed", "max_problems", "eval_problems")}
    else:
        sources = manifest.get("sources", {})
        saved = {"seed": manifest.get("seed"), "max_conversations": manifest.get("max_conversations"),
                 **{field: sources.get(name, {}).get("epochs") for name, (_, field) in SFT_SOURCES.items()},
                 "val_conversations": manifest.get("val_conversations")}
    asked = {field: getattr(config, field) for field in saved}
    if "val_conversations" in asked and "rows" in manifest.get("val", {}):  # a split of fewer gives all it has
        val = manifest["val"]
        asked["val_conversations"] = min(config.val_conversations, val["rows"] - val.get("skipped", 0))
    for field, value in saved.items():
        if value is not None and value != asked[field]:
            raise ConfigError(field, f"{getattr(config, field)!r} differs from the {value!r} that the data in "
                                     f"{data_dir} was prepared with: give that value, or leave out --data-dir to "
                                     "prepare the data this config asks for", type(config).__name__)


def read_jsonl(path: Path) -> list[dict]:
    """The conversations or items of a file this module wrote."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- preparing the data


# The most conversations a mixture may hold before max_conversations cuts it (~12x nanochat's ~0.8M): it is listed
# and shuffled whole, in memory
MAX_MIXTURE = 10_000_000


def check_mixture_size(size: int, config: ChatConfig, epochs_field: str, bound: str = "at least") -> None:
    if size > MAX_MIXTURE:
        raise ConfigError(epochs_field, f"{getattr(config, epochs_field):g} epochs make a mixture of {bound} {size:,} "
                                        f"conversations, more than the {MAX_MIXTURE:,} it may hold; give fewer epochs",
                          "ChatConfig")


def check_source_contributes(config: ChatConfig, epochs_field: str, name: str, conversations: int) -> None:
    """A source asked for (epochs > 0) that would add no conversation: a fraction of an epoch that rounds to none,
    or a split without one; SFT would find out only when it starts."""
    epochs = getattr(config, epochs_field)
    if epochs_size(epochs, conversations) == 0:
        raise ConfigError(epochs_field, f"{epochs:g} epochs of {name}'s {conversations:,} conversations make none; "
                                        "give more, or 0 to leave it out", "ChatConfig")


def check_mixture_fits(config: ChatConfig, cache_dir: Path | None = None) -> None:
    """The mixture's size from its sources' row counts (their parquet footers; nothing is downloaded), in the checks:
    in a pipeline, prepare_sft_data runs after pretraining. Rows that the conversion will skip (a few) are counted, so
    the mixture holds up to this many, and epochs within those few rows of MAX_MIXTURE are refused here. A source that
    cannot be counted (a server without ranges, a file that fails) leaves the check to prepare_sft_data, whose
    download names any problem: a failed count never stops a run."""
    endpoint = hub_endpoint(config.hf_endpoint)
    size = 0
    for name, (source, epochs_field) in SFT_SOURCES.items():
        epochs = getattr(config, epochs_field)
        if epochs == 0:
            continue
        try:
            rows = split_rows(source.repo, source.subset, source.split, endpoint, cache_dir, PROBE_RETRY)
        except DownloadError:
            rows = None
        if rows is None:
            return
        check_source_contributes(config, epochs_field, name, rows)  # (its rows, skipped ones included: at least)
        size += epochs_size(epochs, rows)
        check_mixture_size(size, config, epochs_field, "up to")


def epochs_size(epochs: float, count: int) -> int:
    """How many of `count` lines `epochs` epochs of them make (expand_epochs)."""
    return int(epochs) * count + round((epochs - int(epochs)) * count)


def expand_epochs(lines: list, epochs: float, rng: random.Random) -> list:
    """Every line int(epochs) times, plus a random subset of round(fraction * len) lines for the fraction."""
    whole = int(epochs)
    return lines * whole + rng.sample(lines, round((epochs - whole) * len(lines)))


def prepare_sft_data(config: ChatConfig, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """Write the SFT mixture: out_dir/train.jsonl (each source expanded by its epochs, shuffled with config.seed,
    cut to max_conversations if > 0), out_dir/val.jsonl (val_conversations SmolTalk test conversations) and
    out_dir/manifest.json (written last). Returns the manifest."""
    config.validate()
    endpoint = hub_endpoint(config.hf_endpoint)
    out_dir = Path(out_dir)
    mixture: list[tuple[str, bytes]] = []  # (source name, JSON line)
    sources = {}
    for name, (source, epochs_field) in SFT_SOURCES.items():
        epochs = getattr(config, epochs_field)
        sources[name] = {"repo": source.repo, "subset": source.subset, "split": source.split, "epochs": epochs}
        if epochs == 0:
            continue  # not in the mixture: nothing to download
        check_mixture_size(len(mixture) + int(epochs), config, epochs_field)  # a source has a line or more
        lines, record = convert_split(source, endpoint, cache_dir)
        check_source_contributes(config, epochs_field, name, len(lines))
        check_mixture_size(len(mixture) + epochs_size(epochs, len(lines)), config, epochs_field)
        # a fractional epoch takes its own seeded subset, the same whatever the other sources hold
        expanded = expand_epochs(lines, epochs, random.Random(f"{config.seed}/{name}"))
        mixture += [(name, line) for line in expanded]
        sources[name] |= record | {"conversations_per_epoch": len(lines)}
        print(f"chat data: {name}: {record['rows']:,} rows, {record['skipped']:,} skipped, {epochs:g} epochs -> "
              f"{len(expanded):,} conversations", flush=True)
    random.Random(config.seed).shuffle(mixture)
    if config.max_conversations:
        mixture = mixture[:config.max_conversations]  # a seeded subset: the first N of the seeded shuffle
    used = Counter(name for name, _ in mixture)
    for name in sources:
        sources[name]["conversations"] = used[name]

    val_lines, val = convert_split(VAL_SOURCE, endpoint, cache_dir)
    val_lines = random.Random(f"{config.seed}/val").sample(val_lines, min(config.val_conversations, len(val_lines)))
    val["conversations"] = len(val_lines)

    write_bytes_atomically(out_dir / "train.jsonl", (line for _, line in mixture))
    write_bytes_atomically(out_dir / "val.jsonl", val_lines)
    manifest = {"endpoint": endpoint, "seed": config.seed, "max_conversations": config.max_conversations,
                "sources": sources, "val": val, "train_conversations": len(mixture),
                "val_conversations": len(val_lines)}
    write_bytes_atomically(out_dir / MANIFEST_FILE, [json.dumps(manifest, indent=1).encode()])
    print(f"chat data: {len(mixture):,} training and {len(val_lines):,} validation conversations in {out_dir}",
          flush=True)
    return manifest


def prepare_eval_data(tasks: list[str], out_dir: Path, endpoint: str = "", cache_dir: Path | None = None) -> dict:
    """Write out_dir/<task>.jsonl (the task's evaluation items) for each task, then out_dir/manifest.json.
    Returns the manifest."""
    check_tasks(tasks)
    endpoint = hub_endpoint(endpoint)
    out_dir = Path(out_dir)
    records = {}
    for task in tasks:
        lines, record = convert_split(EVAL_SOURCES[task], endpoint, cache_dir)
        write_bytes_atomically(out_dir / f"{task}.jsonl", lines)
        records[task] = record | {"items": len(lines), "file": f"{task}.jsonl"}
        print(f"chat data: {task}: {len(lines):,} items ({record['skipped']:,} rows skipped)", flush=True)
    manifest = {"endpoint": endpoint, "tasks": records}
    write_bytes_atomically(out_dir / MANIFEST_FILE, [json.dumps(manifest, indent=1).encode()])
    return manifest


def prepare_rl_data(config: RLConfig, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """Write RL's problems: out_dir/train.jsonl (GSM8K train, all or a seeded subset of max_problems),
    out_dir/val.jsonl (a seeded subset of eval_problems GSM8K test problems) and out_dir/manifest.json (written
    last). Returns the manifest. Only the data fields of `config` count here: its callers validated the whole."""
    endpoint = hub_endpoint(config.hf_endpoint)
    out_dir = Path(out_dir)
    parts = {}
    for name, source, wanted in (("train", RL_SOURCE, config.max_problems),
                                 ("val", EVAL_SOURCES["gsm8k"], config.eval_problems)):
        lines, record = convert_split(source, endpoint, cache_dir)
        if wanted and wanted < len(lines):
            lines = random.Random(f"{config.seed}/{name}").sample(lines, wanted)
        write_bytes_atomically(out_dir / f"{name}.jsonl", lines)
        parts[name] = record | {"problems": len(lines)}
        print(f"rl data: {name}: {len(lines):,} GSM8K problems of {record['rows']:,} ({record['skipped']:,} rows "
              f"skipped)", flush=True)
    manifest = {"endpoint": endpoint, "seed": config.seed, "max_problems": config.max_problems,
                "eval_problems": config.eval_problems, **parts}
    write_bytes_atomically(out_dir / MANIFEST_FILE, [json.dumps(manifest, indent=1).encode()])
    return manifest


def check_hub_endpoint(config: ChatConfig | RLConfig) -> None:
    """Fail fast, before any GPU starts, unless the endpoint answers the parquet listing API (probed with a split
    the stage needs: SmolTalk's test split for SFT's validation conversations, GSM8K's test split for RL)."""
    endpoint = hub_endpoint(config.hf_endpoint)
    probe = EVAL_SOURCES["gsm8k"] if isinstance(config, RLConfig) else VAL_SOURCE
    try:
        parquet_urls(probe.repo, probe.subset, probe.split, endpoint, PROBE_RETRY)
    except DownloadError as e:
        raise ConfigError("hf_endpoint", f"{endpoint} does not answer the hub's parquet listing API "
                                         f"({e.url}): {e.cause}; without the hub, point hf_endpoint or $HF_ENDPOINT at "
                                         "a mirror (README: Offline and mirrors)", type(config).__name__) from e
