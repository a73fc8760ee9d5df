"""Chat evaluation: a base or chat checkpoint scored on ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval.

    nanochat chat-eval --checkpoint DIR_OR_URI \
        [--tasks arc_easy,arc_challenge,mmlu,gsm8k,humaneval] [--max-per-task N] [--humaneval auto|on|off]

Every prompt is the item's conversation rendered for the assistant's reply (conversation.render_prompt), for a
base checkpoint too: it never learned the chat format, so expect about chance there; that is the comparison.
- categorical (ARC, MMLU): one forward pass per batch; the answer is the item's letter whose token scores highest
  as the assistant's first token. Only the item's own letters compete (ARC has 3 to 5 choices).
- GSM8K: greedy decoding through the engine's KV cache; the number after `####` must equal the reference.
- HumanEval: greedy decoding; the program (the completion with the prompt's code, the test and
  `check(entry_point)`) must run check() to its end in the sandbox (sandbox.py): pass@1. Where nanochat puts only
  the prompt's imports before a reply that defines the function, the program keeps all the prompt's code before
  the signature (helpers such as HumanEval/38's encode_cyclic, which its test calls), and a reply without the
  definition continues the prompt: the same replies can pass more often here than in nanochat.
ChatCORE (nanochat's definition): the mean over the tasks asked for of (accuracy - chance) / (1 - chance), with
chance 0.25 for the multiple choice tasks (as nanochat, whatever the number of choices) and 0 for the open ones:
0 at chance, 1 for a perfect model. Only when every task asked for was scored: with one skipped (HumanEval without
a sandbox) a mean over the others would be another figure under the same name. (nanochat reports it only when all
five were asked for; a run here that asks for fewer gets their mean, and its table says over how many.)

The CLI reads the datasets from the Hugging Face hub or the mirror in HF_ENDPOINT, prints a table, then the result
as one JSON object on its last line.
"""

import html
import random
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken
import torch

from nanochat_flyte.config import CHAT_EVAL_TASKS, HUMANEVAL_MODES
from nanochat_flyte.data.chat_data import read_jsonl
from nanochat_flyte.data.conversation import render_prompt
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.core import centered
from nanochat_flyte.evaluation.sandbox import Limits, execute, probe_sandbox, sandbox_available
from nanochat_flyte.inference.engine import Engine, SamplingParams, next_token_logits
from nanochat_flyte.model.device import EvalBatches, Precision
from nanochat_flyte.reporting.report import DECK_STYLE, html_table, markdown_grid

CATEGORICAL, GENERATIVE = "categorical", "generative"
TASK_TYPES = {"arc_easy": CATEGORICAL, "arc_challenge": CATEGORICAL, "mmlu": CATEGORICAL, "gsm8k": GENERATIVE,
              "humaneval": GENERATIVE}
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}  # nanochat's
HUMANEVAL_LIMITS = Limits(timeout=10.0)  # per program; HumanEval's own harness gives 3 s to tests that take ms
SANDBOX_WORKERS = 4  # HumanEval programs run at once, each in its own sandbox process
assert tuple(TASK_TYPES) == tuple(CHANCE) == CHAT_EVAL_TASKS

# ------------------------------------------------------------------------------------------- categorical


def letter_token(tokenizer: tiktoken.Encoding, letter: str) -> int:
    """The id of a choice letter as the assistant's first token ("A", no leading space: it follows
    <|assistant_start|>). A byte-level BPE always has it as one token; anything else is a broken item."""
    ids = tokenizer.encode_ordinary(letter)
    if len(ids) != 1:
        raise ValueError(f"the choice letter {letter!r} is {len(ids)} tokens, not one")
    return ids[0]


@torch.inference_mode()
def choose_letters(model: torch.nn.Module, prompts: list[list[int]], letter_ids: list[list[int]], *,
                   batches: EvalBatches, device: torch.device, precision: Precision, pad_id: int) -> list[int]:
    """For each prompt, the index (into its letter_ids) of the letter the model scores highest at the prompt's
    last position."""

    def choose(batch: list[int]) -> list[int]:
        logits = next_token_logits(model, [prompts[i] for i in batch], pad_id=pad_id, device=device,
                                   precision=precision)
        return [int(scores[letter_ids[i]].argmax()) for scores, i in zip(logits, batch)]

    return batches.map(range(len(prompts)), choose)


def score_categorical(engine: Engine, items: list[dict], batches: EvalBatches) -> list[bool | None]:
    """Right or wrong per item; None where the prompt is longer than the model's context."""
    prompts = [render_prompt(engine.tokenizer, item["messages"]) for item in items]
    fits = [index for index, prompt in enumerate(prompts) if len(prompt) <= engine.context]
    letter_ids = [[letter_token(engine.tokenizer, letter) for letter in items[index]["letters"]] for index in fits]
    chosen = choose_letters(engine.model, [prompts[index] for index in fits], letter_ids, batches=batches,
                            device=engine.device, precision=engine.precision, pad_id=engine.tokenizer.eot_token)
    outcomes: list[bool | None] = [None] * len(items)
    for index, choice in zip(fits, chosen):
        outcomes[index] = items[index]["letters"][choice] == items[index]["answer"]
    return outcomes

# ------------------------------------------------------------------------------------------- generative


def generate(engine: Engine, items: list[dict], *, batches: EvalBatches, max_tokens: int) -> list[str | None]:
    """Each item's greedy reply; None where the prompt leaves no room in the model's context."""
    prompts = [render_prompt(engine.tokenizer, item["messages"]) for item in items]
    fits = [index for index, prompt in enumerate(prompts) if len(prompt) < engine.context]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    completions = batches.map(fits, lambda batch: engine.generate_batch([prompts[index] for index in batch], params))
    replies: list[str | None] = [None] * len(items)
    for index, completion in zip(fits, completions):
        replies[index] = completion.text
    return replies


GSM8K_ANSWER = re.compile(r"#### (-?[0-9.,]+)")  # GSM8K's own marker and number pattern (its grader, nanochat's)


def gsm8k_answer(text: str) -> str | None:
    """The number after the first `####`, without thousands separators. As in GSM8K's grader and nanochat's, a
    period after it stays: `#### 18.` is not `18`."""
    match = GSM8K_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


def score_gsm8k(replies: list[str | None], items: list[dict]) -> list[bool | None]:
    return [None if reply is None else gsm8k_answer(reply) == gsm8k_answer(f"#### {item['answer']}")
            for reply, item in zip(replies, items)]


FENCED_CODE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed fence runs to the end


def humaneval_program(item: dict, completion: str, sentinel: str) -> str:
    """The program that tests a completion: a chat model writes the whole function (often in a markdown fence),
    after the prompt's code before it (imports, helper functions); a base model continues the prompt. It prints
    the sentinel once check() has returned."""
    fenced = FENCED_CODE.search(completion)
    code = fenced.group(1) if fenced else completion
    definition = rf"^def {re.escape(item['entry_point'])}\s*\("
    if re.search(definition, code, re.MULTILINE):
        signature = re.search(definition, item["prompt"], re.MULTILINE)
        program = (item["prompt"][:signature.start()] if signature else "") + code
    else:
        program = item["prompt"] + code
    return f"{program}\n\n{item['test']}\n\ncheck({item['entry_point']})\nprint({sentinel!r})\n"


def score_humaneval(replies: list[str | None], items: list[dict], workers: int = SANDBOX_WORKERS
                    ) -> list[bool | None]:
    """Each program in its own sandbox, `workers` at a time, each with every layer the probe found here. A
    program passes only if it printed its sentinel after its test: an exit status of 0 alone (a reply that calls
    exit() before the test) is no pass. The sentinel guards against such slips, not against a program written to
    cheat, which could read it from its own interpreter: the sandbox keeps the host safe, not the score honest."""
    layers = probe_sandbox()[0]

    def passes(reply: str | None, item: dict) -> bool | None:
        if reply is None:
            return None
        sentinel = secrets.token_hex(16)  # fresh per program: no reply writes it by chance
        result = execute(humaneval_program(item, reply, sentinel), HUMANEVAL_LIMITS, require=layers)
        return result.passed and sentinel in result.stdout

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(passes, replies, items))

# ------------------------------------------------------------------------------------------- the whole evaluation

SUBSET_SEED = 42  # the items a subset takes: fixed, so that every run and checkpoint is scored on the same ones


def chatcore(tasks: dict[str, dict], skipped: dict[str, str]) -> float | None:
    """The mean centered accuracy over the tasks asked for; None unless every one of them was scored."""
    return sum(result["centered"] for result in tasks.values()) / len(tasks) if tasks and not skipped else None


def fixed_subset(items: list[dict], max_items: int, seed: int = SUBSET_SEED) -> list[dict]:
    """max_items of the items (all for 0), chosen by the seed alone and kept in dataset order: the same subset on
    every run and with every batch size."""
    if not max_items or max_items >= len(items):
        return items
    return [items[index] for index in sorted(random.Random(seed).sample(range(len(items)), max_items))]


def require_sandbox(owner: str = "ChatConfig") -> None:
    """For `humaneval: on`: one line, naming the humaneval field of `owner` (the config class that set it), where
    the sandbox for model-written code does not work."""
    available, why = sandbox_available()
    if not available:
        raise ConfigError("humaneval", f"on, but the sandbox for model-written code does not work here: {why}",
                          owner)


def humaneval_skip_reason(mode: str, owner: str = "ChatConfig") -> str | None:
    """Why HumanEval will not run (None: it runs); `on` without a sandbox is an error (require_sandbox)."""
    if mode not in HUMANEVAL_MODES:
        raise ConfigError("humaneval", f"must be one of {', '.join(HUMANEVAL_MODES)}, got {mode!r}", owner)
    if mode == "on":
        require_sandbox(owner)
    if mode == "off":
        return "humaneval is off"
    available, why = sandbox_available()
    return None if available else f"no sandbox for model-written code here: {why}"


def evaluate_chat(engine: Engine, items_by_task: dict[str, list[dict]], *, max_per_task: int = 0,
                  batch_size: int = 8, max_tokens: int = 512, humaneval: str = "auto") -> dict:
    """Score the engine's model on each task's items (in CHAT_EVAL_TASKS order). Returns
    {"chatcore", "phase", "tasks": {task: {"accuracy", "correct", "examples", "centered", "chance", "too_long",
    "seconds"}}, "skipped": {task: reason}, "sandbox": HumanEval's isolation layers or None}."""
    unknown = sorted(set(items_by_task) - set(CHAT_EVAL_TASKS))
    if unknown:
        raise ConfigError("eval_tasks", f"unknown task {unknown[0]!r}; choose from {', '.join(CHAT_EVAL_TASKS)}",
                          "ChatConfig")
    for field, value, least in (("eval_max_per_task", max_per_task, 0), ("eval_batch_size", batch_size, 1),
                                ("eval_max_tokens", max_tokens, 1)):
        if value < least:
            raise ConfigError(field, f"must be >= {least}, got {value}", "ChatConfig")
    batches = EvalBatches(batch_size, "chat evaluation")  # shrinks if a batch does not fit on the GPU
    skipped, sandbox = {}, None
    if "humaneval" in items_by_task:
        if reason := humaneval_skip_reason(humaneval):
            skipped["humaneval"] = reason
        else:
            sandbox = sandbox_available()[1]  # the isolation layers HumanEval's programs run under
    tasks = {}
    for task in (task for task in CHAT_EVAL_TASKS if task in items_by_task and task not in skipped):
        items = fixed_subset(items_by_task[task], max_per_task)
        if not items:
            skipped[task] = "no items"
            continue
        start = time.perf_counter()
        if TASK_TYPES[task] == CATEGORICAL:
            outcomes = score_categorical(engine, items, batches)
        else:
            replies = generate(engine, items, batches=batches, max_tokens=max_tokens)
            outcomes = (score_gsm8k(replies, items) if task == "gsm8k" else
                        score_humaneval(replies, items))
        correct = sum(outcome is True for outcome in outcomes)
        accuracy = correct / len(items)
        tasks[task] = {"accuracy": accuracy, "correct": correct, "examples": len(items),
                       "centered": centered(accuracy, CHANCE[task]), "chance": CHANCE[task],
                       "too_long": sum(outcome is None for outcome in outcomes),
                       "seconds": time.perf_counter() - start}
        print(f"chat eval: {task}: {correct}/{len(items)} = {accuracy:.4f} ({tasks[task]['seconds']:.1f} s)",
              flush=True)
    return {"chatcore": chatcore(tasks, skipped), "phase": engine.phase, "tasks": tasks, "skipped": skipped,
            "sandbox": sandbox}


def read_eval_items(directory: str | Path, tasks: list[str]) -> dict[str, list[dict]]:
    """The items of each task from the `<task>.jsonl` files chat_data.prepare_eval_data wrote."""
    return {task: read_jsonl(Path(directory) / f"{task}.jsonl") for task in tasks}

# ------------------------------------------------------------------------------------------- reporting


TABLE_HEADER = ["task", "type", "examples", "accuracy", "centered", "seconds"]


def chat_table_rows(result: dict) -> list[list]:
    rows = [[task, TASK_TYPES[task], scores["examples"], scores["accuracy"], scores["centered"], scores["seconds"]]
            for task, scores in result["tasks"].items()]
    rows += [[task, TASK_TYPES[task], 0, "skipped", reason, ""] for task, reason in result["skipped"].items()]
    if result["chatcore"] is None:  # a mean over fewer than the tasks asked for would be another figure
        return rows + [["ChatCORE", "not computed", "", "", f"needs every task; {len(result['skipped'])} skipped", ""]]
    return rows + [["ChatCORE", f"mean of {len(result['tasks'])} centered", "", "", result["chatcore"], ""]]


def chat_notes(result: dict) -> list[str]:
    """What a reader must know to read the table right."""
    notes = []
    if result.get("phase") == "base":
        notes.append("A base checkpoint: it never learned the chat format these prompts use, so expect about chance "
                     "(centered about 0).")
    if result.get("sandbox"):
        notes.append(f"HumanEval's programs ran in the sandbox: {result['sandbox']}.")
    too_long = {task: scores["too_long"] for task, scores in result["tasks"].items() if scores["too_long"]}
    if too_long:
        notes.append("Prompts longer than the model's context, counted as wrong: "
                     + ", ".join(f"{task} {count}" for task, count in too_long.items()) + ".")
    return notes


def chat_table_markdown(result: dict) -> str:
    """The report card's section."""
    return "\n\n".join(["## Chat evaluation", markdown_grid(TABLE_HEADER, chat_table_rows(result)),
                        *chat_notes(result)])


def chat_table_html(result: dict) -> str:
    """The table on a report card (a flytekit Deck, a Flyte 2 report tab)."""
    notes = "".join(f"<p>{html.escape(note)}</p>" for note in chat_notes(result))
    return "\n".join([DECK_STYLE, "<h2>Chat evaluation</h2>", html_table(TABLE_HEADER, chat_table_rows(result)),
                      notes])


def chat_metrics(result: dict) -> dict[str, float]:
    """Flat metrics for W&B: chat/chatcore (when computed), chat/<task>/accuracy, chat/<task>/centered."""
    metrics = {} if result["chatcore"] is None else {"chat/chatcore": result["chatcore"]}
    for task, scores in result["tasks"].items():
        metrics |= {f"chat/{task}/accuracy": scores["accuracy"], f"chat/{task}/centered": scores["centered"]}
    return metrics
