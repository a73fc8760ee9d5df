"""Chat evaluation: letter scoring, GSM8K answers, HumanEval programs in the sandbox, ChatCORE, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_flyte.cli.chat_eval import main
from nanochat_flyte.cli.usage import run
from nanochat_flyte.config import CHAT_EVAL_TASKS
from nanochat_flyte.data.chat_data import EVAL_SOURCES, load_eval_items, prepare_eval_data
from nanochat_flyte.data.conversation import render_prompt
from nanochat_flyte.data.tokenizer import gpt2_tokenizer
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation import chat_eval
from nanochat_flyte.evaluation.chat_eval import (
    CHANCE,
    centered,
    chat_metrics,
    chat_table_html,
    chat_table_markdown,
    chatcore,
    choose_letters,
    evaluate_chat,
    fixed_subset,
    gsm8k_answer,
    humaneval_program,
    humaneval_skip_reason,
    letter_token,
    read_eval_items,
    score_categorical,
    score_gsm8k,
    score_humaneval,
)
from nanochat_flyte.evaluation.sandbox import execute
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.model.device import EvalBatches, select_precision
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.training.pretrain import train
from tests.helpers import make_data_dir, tiny_config
from tests.hub_server import split_path
from tests.shard_server import serve_shards

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FLOAT32 = select_precision(CPU, "float32")


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()

# ------------------------------------------------------------------------------------------- GSM8K answers


@pytest.mark.parametrize("text, answer", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The total is negative.\n#### -7", "-7"),
    ("#### 18.", "18."),  # as GSM8K's grader and nanochat read it: then no match for 18
    ("#### 2.5", "2.5"),
    ("#### 3\nor maybe\n#### 4", "3"),  # the first answer counts
    ("The answer is 18.", None),  # no marker, no answer
    ("####18", None),  # GSM8K's marker has a space
    ("#### $18", None),
])
def test_gsm8k_answer(text, answer):
    assert gsm8k_answer(text) == answer


def test_gsm8k_scoring_compares_with_the_reference():
    items = [{"answer": "18"}, {"answer": "1234"}, {"answer": "5"}, {"answer": "5"}]
    replies = ["so #### 18", "#### 1,234", "#### 6", None]
    assert score_gsm8k(replies, items) == [True, True, False, None]

# ------------------------------------------------------------------------------------------- categorical


class LetterScores(torch.nn.Module):
    """A model whose logits the test decides: at position t, the sum over the row's tokens 0..t of table[token]
    (causal, as a transformer). Logits cover the first 64 ids, where GPT-2 keeps the letters."""

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]]):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, 64)
        torch.nn.init.zeros_(self.table.weight)
        with torch.no_grad():
            for token, scores in table.items():
                for letter_id, score in scores.items():
                    self.table.weight[token, letter_id] = score

    def forward(self, idx, kv_cache=None, logits_at=None):  # as GPT.forward takes them (no cache here)
        logits = self.table(idx).cumsum(dim=1)
        return logits if logits_at is None else logits[logits_at]


def multiple_choice_item(question: str, letters: str, answer: str) -> dict:
    return {"task": "mmlu", "id": question, "messages": [{"role": "user", "content": question}],
            "letters": list(letters), "answer": answer}


def test_letters_are_single_tokens(tokenizer):
    assert [letter_token(tokenizer, letter) for letter in "ABCDE"] == [32, 33, 34, 35, 36]
    with pytest.raises(ValueError, match="2 tokens"):
        letter_token(tokenizer, "AB1")


def test_categorical_reads_each_prompts_last_position_and_only_its_letters(tokenizer):
    A, B, C, D, E = (letter_token(tokenizer, letter) for letter in "ABCDE")
    apple, river = tokenizer.encode_ordinary(" apple")[0], tokenizer.encode_ordinary(" river")[0]
    # " apple" votes B; " river" votes E, then C; every <|endoftext|> (the BOS, and the padding) votes A a little:
    # a score read at a padded position would be A's.
    model = LetterScores(tokenizer.n_vocab, {apple: {B: 10.0}, river: {E: 10.0, C: 5.0},
                                             tokenizer.eot_token: {A: 1.0}})
    items = [multiple_choice_item("Pick the apple", "ABCD", "B"),
             multiple_choice_item("Pick the river", "ABCD", "C"),  # E is not a choice here: C is next best
             multiple_choice_item("Pick the river", "ABCDE", "E"),
             multiple_choice_item("Pick the apple" + " after a long, long question" * 12, "ABCD", "B")]
    prompts = [render_prompt(tokenizer, item["messages"]) for item in items]
    letter_ids = [[letter_token(tokenizer, letter) for letter in item["letters"]] for item in items]
    expected = [1, 2, 4, 1]
    for batch_size in (1, 2, 4):
        assert choose_letters(model, prompts, letter_ids, batches=EvalBatches(batch_size), device=CPU,
                              precision=FLOAT32, pad_id=tokenizer.eot_token) == expected


def small_gpt(tokenizer, sequence_len: int = 512, seed: int = 0) -> GPT:
    """A depth-1 GPT with random weights everywhere (init_weights zeroes the output projections, which would make
    every prompt's answer depend on its last token alone)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(1, tokenizer.n_vocab, sequence_len))
    model.init_weights()
    for block in model.transformer.h:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.3)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.3)
    return model.eval()


def test_categorical_batches_score_as_one_item_at_a_time(hub_server, tokenizer):
    engine = Engine(small_gpt(tokenizer), tokenizer, FLOAT32, "chat")
    items = load_eval_items("mmlu")[:6] + load_eval_items("arc_challenge")[:4]
    one_at_a_time = []
    for item in items:  # the reference: each prompt alone, no padding, argmax over its letters
        prompt = render_prompt(tokenizer, item["messages"])
        with torch.no_grad():
            scores = engine.model(torch.tensor([prompt]))[0, -1]
        letters = item["letters"]
        chosen = letters[int(scores[[letter_token(tokenizer, letter) for letter in letters]].argmax())]
        one_at_a_time.append(chosen == item["answer"])
    assert len(set(one_at_a_time)) == 2  # the model gets some right and some wrong: the comparison means something
    for batch_size in (3, 10):
        assert score_categorical(engine, items, EvalBatches(batch_size)) == one_at_a_time


def test_a_prompt_longer_than_the_context_counts_as_wrong(hub_server, tokenizer):
    items = load_eval_items("arc_easy")[:3]
    engine = Engine(small_gpt(tokenizer, sequence_len=16), tokenizer, FLOAT32, "chat")
    assert score_categorical(engine, items, EvalBatches(8)) == [None, None, None]

# ------------------------------------------------------------------------------------------- HumanEval


def test_humaneval_programs_pass_with_the_canonical_solutions_and_fail_with_wrong_ones(hub_server):
    items = load_eval_items("humaneval")
    assert len(items) == 8
    continued = [item["canonical_solution"] for item in items]  # a base model continues the prompt
    # a chat model writes the whole function, in a fence, without the prompt's imports (some need them)
    fenced = [f"Here is the function:\n```python\n{item['prompt'][item['prompt'].index('def ' + item['entry_point']):]}"
              f"{item['canonical_solution']}```\nIt works." for item in items]
    unclosed = [f"```python\n{item['prompt']}{item['canonical_solution']}" for item in items]  # cut at max_tokens
    wrong = ["    return None\n"] * len(items)
    assert score_humaneval(continued + fenced + unclosed, items * 3, workers=4) == [True] * 24
    assert score_humaneval(wrong, items, workers=4) == [False] * 8
    assert score_humaneval([None], items[:1], workers=1) == [None]


def test_humaneval_keeps_the_prompts_helper_functions():
    item = {"prompt": "def double(x):\n    return 2 * x\n\n\ndef quadruple(x):\n    \"\"\"4 * x\"\"\"\n",
            "entry_point": "quadruple", "test": "def check(candidate):\n    assert candidate(3) == 12\n"}
    program = humaneval_program(item, "```python\ndef quadruple(x):\n    return double(double(x))\n```", "f00d")
    assert program.startswith("def double(x):") and program.endswith("check(quadruple)\nprint('f00d')\n")
    assert score_humaneval(["```python\ndef quadruple(x):\n    return double(double(x))\n```"], [item], 1) == [True]
    # a right answer that prints more than the sandbox keeps (64 KB) before its sentinel still passes
    loud = "```python\ndef quadruple(x):\n    print('x' * 100_000)\n    return double(double(x))\n```"
    assert score_humaneval([loud], [item], 1) == [True]


@pytest.mark.parametrize("exit_early", ["import os; os._exit(0)", "import sys; sys.exit(0)", "raise SystemExit",
                                        "import atexit, os; atexit.register(os._exit, 0); quit()"])
def test_a_reply_that_exits_before_the_test_does_not_pass(exit_early):
    item = {"prompt": "def never(x):\n", "entry_point": "never",
            "test": "def check(candidate):\n    assert candidate(1) == 'impossible'\n"}
    reply = f"```python\n{exit_early}\ndef never(x):\n    return x\n```"
    assert execute(humaneval_program(item, reply, "sentinel")).passed  # its exit status alone says: passed
    assert score_humaneval([reply], [item], 1) == [False]  # but check() never ran: no sentinel


def test_humaneval_runs_only_where_the_sandbox_works(monkeypatch):
    assert humaneval_skip_reason("off") == "humaneval is off"
    assert humaneval_skip_reason("auto") is None and humaneval_skip_reason("on") is None  # it works here
    monkeypatch.setattr(chat_eval, "sandbox_available", lambda: (False, "unshare: Operation not permitted"))
    assert humaneval_skip_reason("auto") == "no sandbox for model-written code here: unshare: Operation not permitted"
    with pytest.raises(ConfigError, match="ChatConfig.humaneval: on, but the sandbox .* Operation not permitted"):
        humaneval_skip_reason("on")

# ------------------------------------------------------------------------------------------- ChatCORE and subsets


def test_centered_accuracy_and_chatcore():
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0 and centered(0.5, 0.25) == pytest.approx(1 / 3)
    assert centered(0.1, 0.0) == 0.1 and centered(0.0, 0.25) == pytest.approx(-1 / 3)  # below chance is negative
    tasks = {"arc_easy": {"centered": centered(0.5, CHANCE["arc_easy"])},
             "gsm8k": {"centered": centered(0.1, CHANCE["gsm8k"])}}
    assert chatcore(tasks, {}) == pytest.approx((1 / 3 + 0.1) / 2)
    assert chatcore({}, {}) is None
    # a task asked for and skipped: no ChatCORE, as nanochat's (a mean over the others is another figure)
    assert chatcore(tasks, {"humaneval": "no sandbox for model-written code here: ..."}) is None
    assert CHANCE == {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}


def test_fixed_subset_is_seeded_and_in_dataset_order():
    items = [{"id": index} for index in range(100)]
    subset = fixed_subset(items, 10)  # the same items for every run, whatever its training seed
    assert subset == fixed_subset(items, 10, seed=42) and len(subset) == 10
    assert [item["id"] for item in subset] == sorted(item["id"] for item in subset)
    assert subset != fixed_subset(items, 10, seed=43)
    assert fixed_subset(items, 0, 42) == items and fixed_subset(items, 500, 42) == items

# ------------------------------------------------------------------------------------------- evaluate_chat


def test_evaluate_chat_on_every_task(hub_server, tokenizer, tmp_path):
    prepare_eval_data(list(CHAT_EVAL_TASKS), tmp_path / "eval")
    items_by_task = read_eval_items(tmp_path / "eval", list(CHAT_EVAL_TASKS))
    engine = Engine(small_gpt(tokenizer), tokenizer, FLOAT32, "chat")
    result = evaluate_chat(engine, items_by_task, max_per_task=4, batch_size=3, max_tokens=6, humaneval="on")
    assert list(result["tasks"]) == list(CHAT_EVAL_TASKS) and result["skipped"] == {}
    for task, scores in result["tasks"].items():
        assert scores["examples"] == 4 and scores["too_long"] == 0
        assert scores["accuracy"] == scores["correct"] / 4
        assert scores["centered"] == pytest.approx(centered(scores["accuracy"], CHANCE[task]))
    assert result["chatcore"] == pytest.approx(sum(s["centered"] for s in result["tasks"].values()) / 5)
    off = evaluate_chat(engine, {"humaneval": items_by_task["humaneval"], "gsm8k": items_by_task["gsm8k"][:2]},
                        humaneval="off", max_tokens=2)
    assert list(off["tasks"]) == ["gsm8k"] and off["skipped"] == {"humaneval": "humaneval is off"}
    assert off["chatcore"] is None and "chat/chatcore" not in chat_metrics(off)
    assert "| ChatCORE | not computed |  |  | needs every task; 1 skipped |" in chat_table_markdown(off)
    markdown, html = chat_table_markdown(result), chat_table_html(result)
    assert "| arc_easy | categorical | 4 |" in markdown and "ChatCORE" in markdown and "<td>humaneval</td>" in html
    assert chat_metrics(result)["chat/chatcore"] == result["chatcore"]
    assert result["sandbox"] and f"ran in the sandbox: {result['sandbox']}" in markdown
    assert "sandbox: &lt;b&gt; &amp; x.</p>" in chat_table_html({**result, "sandbox": "<b> & x"})  # a note is text

# ------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A base checkpoint trained for a few steps, with room in its context for the evaluation prompts."""
    root = tmp_path_factory.mktemp("chat_eval")
    config = tiny_config(max_seq_len=256, device_batch_size=1, total_batch_size=256, num_iterations=1, eval_every=1,
                         eval_tokens=512, sample_every=1, save_every=1)
    train(config, make_data_dir(root / "data"), root / "checkpoint")
    return root / "checkpoint"


def test_cli_prints_a_table_then_the_result_as_its_last_line(hub_server, checkpoint):
    process = subprocess.run(
        [sys.executable, "-m", "nanochat_flyte", "chat-eval", "--checkpoint", str(checkpoint), "--max-per-task", "3",
         "--max-tokens", "4", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stderr
    lines = process.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result["tasks"]) == set(CHAT_EVAL_TASKS) and result["phase"] == "base"
    assert all(scores["examples"] == 3 for scores in result["tasks"].values())
    assert isinstance(result["chatcore"], float)
    assert "| task | type | examples | accuracy | centered | seconds |" in lines
    assert any(line.startswith("A base checkpoint") for line in lines)


def test_cli_without_the_hub_names_its_mirror_setting(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
    with serve_shards(tmp_path / "empty") as server:  # a server without the datasets: every listing is a 404
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(SystemExit) as exit_info:
            run(lambda: main(["--checkpoint", str(checkpoint), "--tasks", "arc_easy", "--device", "cpu"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(": not found (HTTP 404); without the hub, point $HF_ENDPOINT at a mirror "
                                            "(README: Offline and mirrors)\n")
    # a hub that keeps failing is named after two quick tries, not six backed-off ones
    with serve_shards(tmp_path / "empty") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        source = EVAL_SOURCES["arc_easy"]
        listing = split_path(source.repo, source.subset, source.split)
        server.fail(listing, "503", times=None)
        with pytest.raises(SystemExit):
            run(lambda: main(["--checkpoint", str(checkpoint), "--tasks", "arc_easy", "--device", "cpu"]))
        assert len(server.requests_for(listing)) == 2
    assert "HTTP 503" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_easy,trivia"], "ChatConfig.eval_tasks: unknown task 'trivia'"),
    (["--max-per-task", "-1"], "argument --max-per-task: must be an integer >= 0, got -1"),
    (["--max-per-task", "many"], "argument --max-per-task: must be an integer >= 0, got 'many'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'; choose auto, cuda, mps or cpu"),
    (["--humaneval", "sometimes"], "argument --humaneval: invalid choice: 'sometimes'"),
    (["--checkpoint", "/nonexistent/run"], "argument --checkpoint: no checkpoint.pt in /nonexistent/run"),
    (["--checkpoint"], "argument --checkpoint: expected one argument"),
])
def test_cli_bad_arguments_fail_in_one_line(args, message, capsys):
    argv = args if args[0] == "--checkpoint" else ["--checkpoint", "/nonexistent/run", *args]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
