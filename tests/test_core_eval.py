"""CORE evaluation: bundle loading (directory, zip, HTTP), validation, hand-checked scoring, batching, the CLI."""

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import yaml
from helpers import make_data_dir, tiny_config

from nanochat_flyte.cli.core_eval import main
from nanochat_flyte.cli.usage import run
from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.download import DownloadError
from nanochat_flyte.data.tokenizer import gpt2_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from nanochat_flyte.errors import ConfigError, UserError
from nanochat_flyte.evaluation.bundle import BundleError, CoreTask, check_bundle_url, load_bundle
from nanochat_flyte.evaluation.core import (
    answer_starts,
    centered,
    core_log_metrics,
    core_table,
    core_table_html,
    core_table_markdown,
    fewshot_indices,
    item_rows,
    render,
    score_core,
    score_rows,
    score_task,
    task_subset,
)
from nanochat_flyte.model.device import EvalBatches, Precision
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.pipeline import evaluate, setup
from nanochat_flyte.training.pretrain import train
from tests.core_bundle import TEST_TASKS, TaskSpec, write_bundle, write_core_bundle, zip_directory
from tests.shard_server import fineweb_texts, serve_shards, write_fineweb_shards

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FP32 = Precision(torch.float32, use_grad_scaler=False, device_type="cpu")
LN2 = math.log(2)


# ----------------------------------------------------------------------------- loading


@pytest.fixture
def bundle_dir(tmp_path):
    return write_core_bundle(tmp_path / "bundle", examples_per_task=12)


def summary(bundle):
    return [(task.label, task.task_type, task.num_fewshot, task.delimiter, task.random_baseline, task.examples)
            for task in bundle.tasks]


def test_bundle_loads_from_a_directory_a_zip_and_http_alike(bundle_dir, tmp_path):
    from_dir = load_bundle(bundle_dir, cache_dir=tmp_path / "cache")
    assert [task.label for task in from_dir.tasks] == [spec.label for spec in TEST_TASKS]
    labels = {task.label: task for task in from_dir.tasks}
    assert labels["mc_fewshot"].num_fewshot == 3 and labels["mc_fewshot"].delimiter == " "
    assert labels["qa_answer"].delimiter == "\nAnswer: " and labels["schema_fewshot"].random_baseline == 50.0
    assert labels["mc_fewshot"].examples is labels["mc_zeroshot"].examples  # one dataset file, read once

    local_zip = zip_directory(bundle_dir, tmp_path / "served" / "eval_bundle.zip")  # eval_bundle/ inside
    assert summary(load_bundle(str(local_zip), cache_dir=tmp_path / "cache")) == summary(from_dir)
    flat_zip = zip_directory(bundle_dir, tmp_path / "flat.zip", prefix="")  # core.yaml at the top
    assert summary(load_bundle(flat_zip.as_uri(), cache_dir=tmp_path / "cache")) == summary(from_dir)

    with serve_shards(tmp_path / "served") as server:
        url = f"{server.url}/eval_bundle.zip"
        server.fail("/eval_bundle.zip", "503")  # the real download path: retried
        cache = tmp_path / "http_cache"
        assert summary(load_bundle(url, cache_dir=cache)) == summary(from_dir)
        unpacked = [path for path in cache.iterdir() if path.is_dir()]
        assert len(unpacked) == 1 and (unpacked[0] / "eval_bundle" / "core.yaml").is_file()
        (unpacked[0] / "marker").touch()
        assert summary(load_bundle(url, cache_dir=cache)) == summary(from_dir)
        assert len(server.requests_for("/eval_bundle.zip")) == 2  # the 503 and one download: then the cache
        assert (unpacked[0] / "marker").exists()  # unpacked once, not again


def test_a_local_zip_written_again_is_unpacked_again(bundle_dir, tmp_path):
    local_zip = zip_directory(bundle_dir, tmp_path / "eval_bundle.zip")
    assert len(load_bundle(str(local_zip), cache_dir=tmp_path / "cache").tasks) == len(TEST_TASKS)
    edit_yaml(bundle_dir, lambda tasks: tasks.pop())  # e.g. write_test_core_bundle.py run again with other options
    zip_directory(bundle_dir, local_zip)
    assert [task.label for task in load_bundle(str(local_zip), cache_dir=tmp_path / "cache").tasks] == \
           [spec.label for spec in TEST_TASKS[:-1]]  # not the first zip's unpacked copy


def test_an_fsspec_directory_is_copied_into_the_cache(bundle_dir, tmp_path):
    filesystem = fsspec.filesystem("memory")
    filesystem.put(str(bundle_dir), "/core-test/eval_bundle", recursive=True)
    bundle = load_bundle("memory://core-test/eval_bundle", cache_dir=tmp_path / "cache")
    assert summary(bundle) == summary(load_bundle(bundle_dir))


def edit_yaml(root: Path, change) -> None:
    config = yaml.safe_load((root / "core.yaml").read_text())
    change(config["icl_tasks"])
    (root / "core.yaml").write_text(yaml.safe_dump(config))


def edit_line(root: Path, dataset: str, number: int, change) -> None:
    path = root / "eval_data" / dataset
    lines = path.read_text().splitlines()
    lines[number - 1] = change(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def drop_field(field):
    return lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != field})


MALFORMED = {
    "unknown type": (lambda root: edit_yaml(root, lambda tasks: tasks[3].update(icl_task_type="foo")),
                     "core.yaml: icl_tasks[3] (lm_zeroshot): unknown icl_task_type 'foo'"),
    "no label": (lambda root: edit_yaml(root, lambda tasks: tasks[1].pop("label")),
                 "core.yaml: icl_tasks[1]: needs a 'label'"),
    "bad shots": (lambda root: edit_yaml(root, lambda tasks: tasks[0].update(num_fewshot=[-1])),
                  "core.yaml: icl_tasks[0] (mc_fewshot): num_fewshot must be an integer >= 0"),
    "too many shots": (lambda root: edit_yaml(root, lambda tasks: tasks[0].update(num_fewshot=[12])),
                       "icl_tasks[0] (mc_fewshot): num_fewshot 12 needs at least 13 examples; "
                       "eval_data/reasoning/choices.jsonl has 12"),
    "no data file": (lambda root: edit_yaml(root, lambda tasks: tasks[2].update(dataset_uri="nope.jsonl")),
                     "icl_tasks[2] (schema_fewshot): dataset_uri 'nope.jsonl': no such file eval_data/nope.jsonl"),
    "absolute data file": (lambda root: edit_yaml(root, lambda tasks: tasks[2].update(dataset_uri="/etc/hosts")),
                           "icl_tasks[2] (schema_fewshot): dataset_uri '/etc/hosts' must be a path under eval_data/"),
    "data file outside": (lambda root: edit_yaml(root, lambda tasks: tasks[2].update(dataset_uri="../core.yaml")),
                          "icl_tasks[2] (schema_fewshot): dataset_uri '../core.yaml' must be a path under eval_data/"),
    "missing gold": (lambda root: edit_line(root, "reasoning/choices.jsonl", 12, drop_field("gold")),
                     "eval_data/reasoning/choices.jsonl line 12: missing field 'gold'"),
    "gold out of range": (lambda root: edit_line(root, "commonsense/schema.jsonl", 3,
                                                 lambda line: json.dumps({**json.loads(line), "gold": 2})),
                          "eval_data/commonsense/schema.jsonl line 3: field 'gold' is 2, not an index into the 2 "
                          "'context_options'"),
    "wrong type": (lambda root: edit_line(root, "language/completion.jsonl", 5,
                                          lambda line: json.dumps({**json.loads(line), "continuation": 7})),
                   "eval_data/language/completion.jsonl line 5: field 'continuation' must be a str (int found)"),
    "bad json": (lambda root: edit_line(root, "knowledge/qa.jsonl", 2, lambda line: line[:-1]),
                 "eval_data/knowledge/qa.jsonl line 2: not valid JSON"),
    "no baseline row": (lambda root: (root / "eval_meta_data.csv").write_text(
                            "\n".join((root / "eval_meta_data.csv").read_text().splitlines()[:-1]) + "\n"),
                        "eval_meta_data.csv: no 'Random baseline' row for task 'qa_answer'"),
    "bad baseline": (lambda root: (root / "eval_meta_data.csv").write_text(
                         (root / "eval_meta_data.csv").read_text().replace("50.0", "fifty")),
                     "eval_meta_data.csv line 4: 'Random baseline' of 'schema_fewshot' must be a number in [0, 100)"),
    "no csv": (lambda root: (root / "eval_meta_data.csv").unlink(), "eval_meta_data.csv: missing"),
    "csv not utf-8": (lambda root: (root / "eval_meta_data.csv").write_bytes(
                          (root / "eval_meta_data.csv").read_bytes() + "caf\u00e9,25.0\n".encode("cp1252")),
                      "eval_meta_data.csv: not UTF-8 text (invalid continuation byte at line 7)"),
    "data not utf-8": (lambda root: (root / "eval_data" / "knowledge" / "qa.jsonl").write_bytes(
                           (root / "eval_data" / "knowledge" / "qa.jsonl").read_bytes() + b'{"context": "caf\xe9"}\n'),
                       "eval_data/knowledge/qa.jsonl line 13: not UTF-8 text (invalid continuation byte)"),
    "no core.yaml": (lambda root: (root / "core.yaml").unlink(), "no single core.yaml in the bundle"),
    "not yaml": (lambda root: (root / "core.yaml").write_text("icl_tasks: [\n"), "core.yaml: not valid YAML"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_bundle_names_the_file_and_the_field(bundle_dir, case):
    break_it, message = MALFORMED[case]
    break_it(bundle_dir)
    with pytest.raises(BundleError) as error:
        load_bundle(bundle_dir)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_run_with_core_during_training_checks_its_bundle_before_the_first_step(bundle_dir, tmp_path, monkeypatch):
    MALFORMED["missing gold"][0](bundle_dir)
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
    config = tiny_config(core_metric_every=3, eval_bundle_url=str(bundle_dir))
    with pytest.raises(BundleError, match="missing field 'gold'"):
        train(config, make_data_dir(tmp_path / "data"), tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "train/loss" not in metrics.read_text()  # not at step 3: before step 1


@pytest.mark.parametrize("served", [False, True], ids=["local", "http"])
def test_a_bundle_of_ones_own_is_checked_before_pretraining(served, bundle_dir, tmp_path, monkeypatch):
    """Too few items for its shots, or a malformed file, fails in the checks: not after training, where CORE reads it.
    A served bundle is downloaded once, into the cache that CORE then reads on the same machine."""
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
    write_fineweb_shards(tmp_path / "shards", [0, 1822], 5)
    shots = max(task.num_fewshot for task in TEST_TASKS)
    config = RunConfig(data_url=str(tmp_path / "shards"), num_shards=1, core_max_per_task=shots)
    with serve_shards(tmp_path / "served") as server:
        def check(**fields):
            if served:  # the bundle as it is now, at a URL of its own (the cache is per URL)
                name = f"eval_bundle_{len(list((tmp_path / 'served').glob('*.zip')))}.zip"
                url = f"{server.url}/{zip_directory(bundle_dir, tmp_path / 'served' / name).name}"
            return setup.base_run(dataclasses.replace(config, eval_bundle_url=url if served else str(bundle_dir),
                                                      **fields), "")

        with pytest.raises(ConfigError, match=rf"^RunConfig\.core_max_per_task: {shots} items per task leave"):
            check()
        assert check(core_max_per_task=shots + 1).core_max_per_task == shots + 1
        if served:
            def downloads():
                return [r for r in server.requests_for("/eval_bundle_1.zip") if r.method == "GET"]
            assert len(downloads()) == 1
            load_bundle(f"{server.url}/eval_bundle_1.zip")  # CORE, after training
            assert len(downloads()) == 1
        MALFORMED["missing gold"][0](bundle_dir)
        with pytest.raises(BundleError, match="missing field 'gold'"):
            check(core_max_per_task=shots + 1)


def test_a_file_that_is_not_a_zip_fails_as_a_download(tmp_path):
    (tmp_path / "eval_bundle.zip").write_text("<html>Access denied</html>")
    with pytest.raises(DownloadError, match="the CORE eval bundle .* not a readable zip"):
        load_bundle(tmp_path / "eval_bundle.zip", cache_dir=tmp_path / "cache")


def test_a_zip_that_fails_to_unpack_leaves_nothing_in_the_cache(bundle_dir, tmp_path):
    zip_path = zip_directory(bundle_dir, tmp_path / "eval_bundle.zip")
    data = bytearray(zip_path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # a member's bytes, not the directory at the end: its CRC check fails on unpacking
    zip_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cannot be unpacked"):
        load_bundle(zip_path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_check_bundle_url_probes_without_downloading(bundle_dir, tmp_path):
    check_bundle_url(str(bundle_dir))
    zip_path = zip_directory(bundle_dir, tmp_path / "served" / "eval_bundle.zip")
    check_bundle_url(str(zip_path))
    with pytest.raises(ConfigError, match="eval_bundle_url: .*not found"):
        check_bundle_url(str(tmp_path / "missing.zip"))
    with pytest.raises(ConfigError, match="eval_bundle_url: .*no single core.yaml"):
        check_bundle_url(str(tmp_path / "served"))
    script = Path(__file__).resolve().parents[1] / "scripts" / "write_test_core_bundle.py"  # the README's bundle
    subprocess.run([sys.executable, str(script), str(tmp_path / "readme.zip")], check=True, capture_output=True)
    check_bundle_url(str(tmp_path / "readme.zip"))
    (tmp_path / "bundle.zip").write_text("not a zip")
    with pytest.raises(ConfigError, match="eval_bundle_url: .*bundle.zip' is not a zip file"):
        check_bundle_url(str(tmp_path / "bundle.zip"))
    with serve_shards(tmp_path / "served") as server:
        check_bundle_url(f"{server.url}/eval_bundle.zip")
        with pytest.raises(ConfigError, match="eval_bundle_url: .*unreachable: not found"):
            check_bundle_url(f"{server.url}/other.zip")
        assert [request.method for request in server.requests] == ["HEAD", "HEAD"]


# ----------------------------------------------------------------------------- hand-checked scoring


def byte_tokenizer() -> tiktoken.Encoding:
    """One token per byte (ids 0..255, "a" is 97), <|endoftext|> is 256: prompts are easy to follow by hand."""
    return tiktoken.Encoding(name="bytes", pat_str=r"(?s:.)", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


class BigramModel(nn.Module):
    """p(next byte | previous byte) as the test sets it; every other next byte shares the rest uniformly."""

    def __init__(self, sequence_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.table = nn.Parameter(torch.full((257, 257), -math.log(257)))

    def set(self, previous: str, probabilities: dict[str, float]) -> None:
        rest = (1 - sum(probabilities.values())) / (257 - len(probabilities))
        row = torch.full((257,), rest)
        for token, probability in probabilities.items():
            row[ord(token)] = probability
        with torch.no_grad():
            self.table[ord(previous)] = row.log()

    def forward(self, idx, logits_at=None):  # logits_at as GPT.forward takes it
        logits = self.table[idx]
        return logits if logits_at is None else logits[logits_at]


def scores(model, task, index):
    rows = item_rows(byte_tokenizer(), task, [index], model.config.sequence_len)[0]
    return score_rows(model, rows, batches=EvalBatches(4), pad_token=256, device=CPU, precision=FP32)


HAND_TASKS = (
    TaskSpec("mc", "multiple_choice", 0, "mc.jsonl", random_baseline=25.0),
    TaskSpec("schema", "schema", 0, "schema.jsonl", random_baseline=50.0),
    TaskSpec("lm", "language_modeling", 0, "lm.jsonl"),
)
HAND_EXAMPLES = {
    "mc.jsonl": [{"query": "Q", "choices": ["ab", "cdef"], "gold": 1},
                 {"query": "Q", "choices": ["ab", "cdef"], "gold": 0}],
    "schema.jsonl": [{"context_options": ["xA", "xB"], "continuation": "c", "gold": 0},
                     {"context_options": ["xA", "xB"], "continuation": "c", "gold": 1}],
    "lm.jsonl": [{"context": "ab", "continuation": "cd"}, {"context": "ab ", "continuation": "ce"},
                 {"context": "ab", "continuation": "c"}],
}


@pytest.fixture
def hand_model():
    model = BigramModel()
    # multiple choice: the space is shared by both prompts, so it is not scored: "ab" costs 3 + 1 bits (sum 4,
    # mean 2); "cdef" 2 + 1 + 1 + 1 (sum 5, mean 5/4)
    model.set("Q", {" ": 1 / 2})
    model.set(" ", {"a": 1 / 8, "c": 1 / 4})
    model.set("a", {"b": 1 / 2})
    model.set("c", {"d": 1 / 2, "e": 1 / 4})
    model.set("d", {"e": 1 / 2})
    model.set("e", {"f": 1 / 2})
    # schema: the context "xB" is far likelier, but the continuation " c" is likelier after "xA"
    model.set("x", {"A": 0.001, "B": 0.9})
    model.set("A", {" ": 0.9})
    model.set("B", {" ": 0.1})
    # language modeling: after "ab" greedy decoding writes " cd" (" c" then "d", not "e")
    model.set("b", {" ": 0.9})
    return model


@pytest.fixture
def hand_bundle(tmp_path):
    return load_bundle(write_bundle(tmp_path / "hand", HAND_TASKS, HAND_EXAMPLES))


def test_multiple_choice_picks_the_lowest_mean_loss_not_the_lowest_sum(hand_model, hand_bundle):
    task = hand_bundle.tasks[0]
    mean_losses, _ = scores(hand_model, task, 0)
    assert mean_losses == pytest.approx([2 * LN2, 5 / 4 * LN2])  # sums 4 and 5 bits: "ab" has the lower sum
    assert score_task(hand_model, byte_tokenizer(), task, [0, 1], batches=EvalBatches(3), context_len=64, device=CPU,
                      precision=FP32) == [True, False]  # "cdef" is the answer: right for gold 1, wrong for gold 0


def test_schema_scores_only_the_continuation_under_each_context(hand_model, hand_bundle):
    task = hand_bundle.tasks[1]
    mean_losses, _ = scores(hand_model, task, 0)
    c_after_space = -math.log(1 / 4)  # the same under both contexts
    assert mean_losses == pytest.approx([(-math.log(0.9) + c_after_space) / 2, (-math.log(0.1) + c_after_space) / 2])
    assert score_task(hand_model, byte_tokenizer(), task, [0, 1], batches=EvalBatches(3), context_len=64, device=CPU,
                      precision=FP32) == [True, False]


def test_language_modeling_needs_every_continuation_token(hand_model, hand_bundle):
    task = hand_bundle.tasks[2]
    assert [scores(hand_model, task, index)[1] for index in range(3)] == [[True], [False], [True]]
    rows = item_rows(byte_tokenizer(), task, [1], 64)[0]
    assert bytes(rows[0].tokens[1:]).decode() == "ab ce"  # the context's trailing space is stripped
    assert bytes(rows[0].tokens[rows[0].start:]).decode() == " ce"


def test_centered_accuracy_and_core_arithmetic(hand_model, hand_bundle):
    assert centered(0.5, 0.25) == pytest.approx(1 / 3)
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.6) == 1
    result = score_core(hand_model, byte_tokenizer(), hand_bundle, batch_size=2)
    tasks = result["tasks"]
    assert [tasks[label]["accuracy"] for label in ("mc", "schema", "lm")] == [1 / 2, 1 / 2, 2 / 3]
    assert [tasks[label]["centered"] for label in ("mc", "schema", "lm")] == pytest.approx([1 / 3, 0, 2 / 3])
    assert result["core_metric"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert tasks["mc"] | {"seconds": 0} == {"type": "multiple_choice", "shots": 0, "examples": 2, "items": 2,
                                            "accuracy": 0.5, "centered": pytest.approx(1 / 3), "seconds": 0}
    assert result["max_per_task"] is None and result["bundle"] == hand_bundle.source
    json.dumps(result)  # the results JSON takes it as it is
    assert core_log_metrics(result) == {"core_metric": result["core_metric"], "core/mc": tasks["mc"]["centered"],
                                        "core/schema": tasks["schema"]["centered"], "core/lm": tasks["lm"]["centered"]}


def test_a_long_prompt_loses_tokens_from_the_left(hand_model, hand_bundle):
    task = hand_bundle.tasks[0]
    full = item_rows(byte_tokenizer(), task, [0], 64)[0]
    cropped = item_rows(byte_tokenizer(), task, [0], 6)[0]  # <|endoftext|>Q cdef is 7 tokens: one too many
    assert [len(row.tokens) for row in full] == [5, 7] and [len(row.tokens) for row in cropped] == [5, 6]
    for whole, short in zip(full, cropped):
        assert short.tokens == whole.tokens[-6:] and short.tokens[short.start:] == whole.tokens[whole.start:]
    cropped = item_rows(byte_tokenizer(), task, [0], 3)[0]  # " cdef" is longer than the whole context:
    assert [row.tokens for row in cropped] == [list(b" ab"), list(b"def")]  # what fits is scored, after a first
    assert [row.start for row in cropped] == [1, 1]  # token that only predicts


# ----------------------------------------------------------------------------- prompts and subsets


def test_fewshot_examples_are_other_items_chosen_the_same_way_every_time(bundle_dir):
    task = load_bundle(bundle_dir).tasks[0]  # mc_fewshot: 3 shots from 12 items
    for index in range(len(task.examples)):
        shots = fewshot_indices(len(task.examples), index, task.num_fewshot)
        assert index not in shots and len(set(shots)) == 3 and all(0 <= shot < 12 for shot in shots)
        assert shots == fewshot_indices(len(task.examples), index, task.num_fewshot)
        context, continuation = render(task, index)[0]
        query = task.examples[index]["query"]
        assert context.endswith(query) and query not in context[:-len(query)]
        for shot in shots:  # each shot is shown solved, then a blank line
            example = task.examples[shot]
            assert f"{example['query']} {example['choices'][example['gold']]}\n\n" in context
    assert len({tuple(fewshot_indices(12, index, 3)) for index in range(12)}) > 1  # not one fixed set


def test_answer_spans_follow_nanochat_rules():
    # multiple choice: choices that start alike (" the cat", " the dog") are scored on what differs
    assert answer_starts("multiple_choice", [[0, 1, 2, 3], [0, 1, 2, 4, 5]], []) == [3, 3]
    # ... and a choice that is a prefix of another keeps its last token
    assert answer_starts("multiple_choice", [[0, 1, 2], [0, 1, 2, 3]], []) == [2, 3]
    # schema: the continuation [8, 9], and the ending [7] that both contexts share
    assert answer_starts("schema", [[0, 5, 7, 8, 9], [0, 6, 6, 7, 8, 9]], []) == [2, 3]
    # language modeling: what follows the common prefix, here with the context's last token merged into another
    assert answer_starts("language_modeling", [[0, 1, 2, 3], [0, 1, 4]], [[0, 1, 2], [0, 1, 9]]) == [3, 2]


def test_answer_spans_with_gpt2_and_bpe(bundle_dir, bpe):
    bundle = load_bundle(bundle_dir)
    for tokenizer in (gpt2_tokenizer(), bpe):
        for task in bundle.tasks:
            indices = list(range(len(task.examples)))
            for index, rows in zip(indices, item_rows(tokenizer, task, indices, 10_000)):
                options = render(task, index)
                for (context, continuation), row in zip(options, rows):
                    assert row.tokens[0] == tokenizer.eot_token
                    assert tokenizer.decode(row.tokens[1:]) == context + continuation
                    assert 1 <= row.start < len(row.tokens)
                    if task.task_type == "multiple_choice":  # what precedes the span is the same in every row
                        assert continuation.endswith(tokenizer.decode(row.tokens[row.start:]))
                        assert {tuple(other.tokens[:row.start]) for other in rows} == {tuple(row.tokens[:row.start])}
                    elif task.task_type == "schema":  # the span holds the whole continuation
                        assert tokenizer.decode(row.tokens[row.start:]).endswith(continuation.strip())
                    else:  # the item's continuation, not the delimiter's words before it
                        span = tokenizer.decode(row.tokens[row.start:])
                        assert span.endswith(task.examples[index]["continuation"].strip())
                        assert not task.delimiter.strip() or task.delimiter.strip() not in span
    tokenizer = gpt2_tokenizer()
    task = CoreTask("mc", "multiple_choice", 0, " ", 25.0,
                    ({"query": "Q:", "choices": ["the cat", "the dog"], "gold": 0},))
    rows = item_rows(tokenizer, task, [0], 100)[0]
    assert [tokenizer.decode(row.tokens[row.start:]) for row in rows] == [" cat", " dog"]
    # language modeling with a delimiter of words (jeopardy's): the answer is scored, not "\nAnswer:" before it
    task = CoreTask("jeopardy", "language_modeling", 0, "\nAnswer: ", 0.0,
                    ({"context": "The capital of France", "continuation": "Paris"},))
    (row,) = item_rows(tokenizer, task, [0], 100)[0]
    assert tokenizer.decode(row.tokens[row.start:]) == " Paris"


def test_the_evaluated_items_and_their_shots_are_nanochats(bundle_dir):
    """nanochat's base_eval shuffles each task with Random(1337) and keeps the first max_per_task; core_eval draws
    item i's shots with Random(1234 + i).sample from the other items of that set. The same rule, written out here
    from its description, gives the same items and the same prompts."""
    task = load_bundle(bundle_dir).tasks[0]  # mc_fewshot: 3 shots from 12 items
    for max_per_task in (None, 8, 5):
        shuffled = list(task.examples)
        random.Random(1337).shuffle(shuffled)
        evaluated = shuffled[:max_per_task]
        subset = task_subset(task, max_per_task)
        assert list(subset.examples) == evaluated and subset.examples == task_subset(task, max_per_task).examples
        for position, item in enumerate(evaluated):
            others = [i for i in range(len(evaluated)) if i != position]
            shots = [evaluated[i] for i in random.Random(1234 + position).sample(others, task.num_fewshot)]
            prefix = "".join(f"{shot['query']} {shot['choices'][shot['gold']]}\n\n" for shot in shots)
            assert render(subset, position)[0] == (prefix + item["query"], " " + item["choices"][0])
    assert task_subset(task, 5).examples == task_subset(task, 8).examples[:5]  # a larger N extends a smaller one
    assert list(task_subset(task, 5).examples) != list(task.examples[:5])  # shuffled, not the first five


# ----------------------------------------------------------------------------- batching, a real GPT, both tokenizers


def random_gpt(vocab_size: int, sequence_len: int = 48) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=32))
    model.init_weights()
    nn.init.normal_(model.lm_head.weight, std=0.5)  # init_weights zeroes the head: every choice would tie
    return model


@pytest.fixture(scope="module")
def bpe():
    """Our BPE with a small vocabulary: a model's output layer over GPT-2's 50,257 tokens is slow on a CPU."""
    return train_bpe(fineweb_texts(50), vocab_size=400)


def test_batched_scoring_matches_one_row_at_a_time(bundle_dir, bpe):
    bundle, tokenizer = load_bundle(bundle_dir), bpe
    model = random_gpt(tokenizer.n_vocab)
    rows = [row for task in bundle.tasks for item in item_rows(tokenizer, task, list(range(len(task.examples))), 48)
            for row in item]
    assert max(len(row.tokens) for row in rows) == 48 > min(len(row.tokens) for row in rows)  # cropped and padded
    one = score_rows(model, rows, batches=EvalBatches(1), pad_token=tokenizer.eot_token, device=CPU, precision=FP32)
    batched = score_rows(model, rows, batches=EvalBatches(7), pad_token=tokenizer.eot_token, device=CPU, precision=FP32)
    assert batched[0] == pytest.approx(one[0], rel=1e-5) and batched[1] == one[1]
    single = score_core(model, tokenizer, bundle, batch_size=1)
    together = score_core(model, tokenizer, bundle, batch_size=16)
    assert [task["accuracy"] for task in single["tasks"].values()] == \
           [task["accuracy"] for task in together["tasks"].values()]
    subset = score_core(model, tokenizer, bundle, max_per_task=5, batch_size=16)
    assert {task["examples"] for task in subset["tasks"].values()} == {5}
    assert subset == score_core(model, tokenizer, bundle, max_per_task=5, batch_size=16) | {
        "seconds": subset["seconds"], "tasks": {label: task | {"seconds": subset["tasks"][label]["seconds"]}
                                                for label, task in subset["tasks"].items()}}
    with pytest.raises(ValueError, match="max_per_task must be >= 1"):
        score_core(model, tokenizer, bundle, max_per_task=0)


def test_our_bpe_tokenizer_evaluates_too(bundle_dir, bpe):
    tokenizer = bpe
    model = random_gpt(tokenizer.n_vocab)
    result = score_core(model, tokenizer, load_bundle(bundle_dir), batch_size=8)
    assert set(result["tasks"]) == {spec.label for spec in TEST_TASKS}
    assert all(0 <= task["accuracy"] <= 1 for task in result["tasks"].values())
    assert model.training  # handed back in the mode it came in


def counting_rows(model: nn.Module) -> list[int]:
    """The rows of every forward pass the model makes from now on."""
    rows: list[int] = []
    model.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].size(0)))
    return rows


def evaluate_on_rank(rank: int, world_size: int, init_file: str, bundle_dir: str, tokenizer_dir: str,
                     expected: dict, single_rows: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(Path(tokenizer_dir))
        model = random_gpt(tokenizer.n_vocab)
        rows = counting_rows(model)
        result = score_core(model, tokenizer, load_bundle(bundle_dir), batch_size=8)
        assert {label: (task["accuracy"], task["examples"]) for label, task in result["tasks"].items()} == expected
        assert sum(rows) < 0.75 * single_rows  # about half the items each: shared, not each scoring all
    finally:
        dist.destroy_process_group()


def test_ranks_share_the_items_and_sum_the_counts(bundle_dir, bpe, tmp_path):
    model = random_gpt(bpe.n_vocab)
    rows = counting_rows(model)
    single = score_core(model, bpe, load_bundle(bundle_dir), batch_size=8)
    expected = {label: (task["accuracy"], task["examples"]) for label, task in single["tasks"].items()}
    tokenizer_dir = save_tokenizer(bpe, tmp_path / "tokenizer")
    mp.spawn(evaluate_on_rank, args=(2, str(tmp_path / "rendezvous"), str(bundle_dir), str(tokenizer_dir), expected,
                                     sum(rows)), nprocs=2)


# ----------------------------------------------------------------------------- report tables


def test_the_per_task_table_renders_as_markdown_and_html():
    result = {"core_metric": 0.125, "tasks": {
        "hellaswag": {"type": "multiple_choice", "shots": 10, "examples": 500, "accuracy": 0.3, "centered": 0.0667,
                      "seconds": 3.0},
        "a|b": {"type": "language_modeling", "shots": 0, "examples": 20, "accuracy": 0.1834, "centered": 0.1834,
                "seconds": 1.0}}}
    header, rows = core_table(result)
    assert header == ["task", "type", "shots", "examples", "accuracy", "centered"]
    assert rows[-1] == ["CORE", "", "", 520, "", 0.125]
    assert core_table_markdown(result).splitlines() == [
        "## CORE", "",
        "| task | type | shots | examples | accuracy | centered |", "|---|---|---|---|---|---|",
        "| hellaswag | multiple_choice | 10 | 500 | 0.3 | 0.0667 |",
        r"| a\|b | language_modeling | 0 | 20 | 0.1834 | 0.1834 |", "| CORE |  |  | 520 |  | 0.125 |"]
    html = core_table_html(result)
    assert "<h2>CORE</h2>" in html and "<th>centered</th>" in html and "<td>0.125</td>" in html
    # a CORE of a sample of each task says so, and names its bundle, on both cards
    sampled = result | {"bundle": "https://example.org/eval_bundle.zip", "max_per_task": 100,
                        "tasks": {label: task | {"items": 1000} for label, task in result["tasks"].items()}}
    whole = {label: task | {"items": task["examples"]} for label, task in result["tasks"].items()}
    assert "At most" not in core_table_markdown(result | {"max_per_task": 100000, "tasks": whole})  # all scored
    assert core_table_markdown(sampled).endswith(
        "\n\nBundle: https://example\\.org/eval\\_bundle\\.zip\n\nAt most 100 items a task, a seeded sample of "
        "each: an estimate, not comparable with a CORE score over every item.")
    sampled_html = core_table_html(sampled | {"bundle": "<b>.zip"})
    assert "<p>Bundle: &lt;b&gt;.zip</p>" in sampled_html and "<p>At most 100 items a task" in sampled_html


# ----------------------------------------------------------------------------- the CLI, end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data_dir = make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=5_000, n_val_tokens=1_000)
    out = tmp_path_factory.mktemp("checkpoint")
    train(tiny_config(num_iterations=3), data_dir, out)
    return out


def test_the_cli_scores_a_trained_checkpoint_on_a_served_bundle(checkpoint, bundle_dir, tmp_path, monkeypatch,
                                                                  capsys):
    zip_directory(bundle_dir, tmp_path / "served" / "eval_bundle.zip")
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
    with serve_shards(tmp_path / "served") as server:
        result = main(["--checkpoint", str(checkpoint), "--bundle", f"{server.url}/eval_bundle.zip",
                       "--max-per-task", "6", "--device", "cpu", "--batch-size", "5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert set(result["tasks"]) == {spec.label for spec in TEST_TASKS}
    assert all(task["examples"] == 6 for task in result["tasks"].values())
    assert set(json.loads(lines[-1])["tasks"]["mc_fewshot"]) >= {"accuracy", "centered", "examples"}
    start = lines.index("| task | type | shots | examples | accuracy | centered |")
    table = [line for line in lines[start:-1] if line.startswith("|")]
    assert len(table) == 2 + len(TEST_TASKS) + 1 and table[2].startswith("| mc_fewshot | multiple_choice | 3 | 6 |")
    assert lines[start - 2] == "## CORE" and lines[-2].startswith("At most 6 items a task")
    assert (tmp_path / "cache" / "eval_bundle").is_dir()  # the default cache: default_cache_dir("eval_bundle")


def test_a_wrong_checkpoint_fails_before_the_bundle_is_downloaded(bundle_dir, tmp_path, monkeypatch, capsys):
    zip_directory(bundle_dir, tmp_path / "served" / "eval_bundle.zip")
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "cache"))
    with serve_shards(tmp_path / "served") as server:
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(tmp_path), "--bundle", f"{server.url}/eval_bundle.zip", "--device", "cpu"])
    assert capsys.readouterr().err == (f"error: argument --checkpoint: no checkpoint.pt in {tmp_path}: not a "
                                       "checkpoint directory (see nanochat core-eval --help)\n")
    assert server.requests == []


@pytest.mark.parametrize("arguments, message", [
    (["--max-per-task", "-1"], "argument --max-per-task: must be an integer >= 0, got -1"),
    (["--batch-size", "many"], "argument --batch-size: must be an integer >= 1, got 'many'"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'; choose auto, cuda, mps or cpu"),
    (["--max-per-task", "3"], "core-eval.max_per_task: 3 items per task leave mc_fewshot's 3-shot prompts too few "
                              "others to draw their examples from: give at least 4, or 0 for every item"),
])
def test_bad_arguments_get_one_line(checkpoint, bundle_dir, arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(lambda: main(["--checkpoint", str(checkpoint), "--bundle", str(bundle_dir), *arguments]))
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error and error.count("\n") == 1


def test_a_malformed_bundle_is_named(checkpoint, bundle_dir):
    MALFORMED["missing gold"][0](bundle_dir)
    with pytest.raises(BundleError) as error:
        main(["--checkpoint", str(checkpoint), "--bundle", str(bundle_dir), "--device", "cpu"])
    assert str(error.value) == (f"eval bundle {bundle_dir}: eval_data/reasoning/choices.jsonl line 12: "
                                "missing field 'gold'")


def test_the_pipelines_core_task_checks_a_bundles_shots_before_it_loads_the_model(bundle_dir, tmp_path):
    """The bundle at a URL may have changed since the checks read it: too few items for its shots is one line that
    keeps the checkpoint, before the model is read (here there is none to read)."""
    gone = tmp_path / "checkpoint"
    with pytest.raises(UserError, match=rf"RunConfig.core_max_per_task: 3 items per task .* kept at {gone}"):
        evaluate.base_model(tiny_config(), str(gone), str(bundle_dir), 3, lambda *_: None)


def test_the_pipelines_core_task_names_the_kept_checkpoint_when_the_bundle_is_gone(tmp_path):
    gone = tmp_path / "checkpoint"
    with pytest.raises(UserError, match=rf"^the CORE eval bundle could not be downloaded from .*missing\.zip: not "
                                        rf"found\. The trained checkpoint is kept at {gone}; score it later with "
                                        rf"nanochat core-eval --checkpoint {gone} --bundle BUNDLE$"):
        evaluate.base_model(tiny_config(), str(gone), str(tmp_path / "missing.zip"), 3, lambda *_: None)


def test_a_missing_bundle_is_named(checkpoint, tmp_path):
    with pytest.raises(DownloadError) as error:
        main(["--checkpoint", str(checkpoint), "--bundle", str(tmp_path / "missing.zip"), "--device", "cpu"])
    missing = tmp_path / "missing.zip"
    assert str(error.value) == f"the CORE eval bundle could not be downloaded from {missing}: not found"


def test_the_cli_process_exits_non_zero_without_a_traceback(bundle_dir, tmp_path):
    process = subprocess.run([sys.executable, "-m", "nanochat_flyte", "core-eval", "--checkpoint", str(tmp_path / "no"),
                              "--bundle", str(bundle_dir), "--device", "cpu"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and process.stdout == ""
    assert process.stderr == (f"error: argument --checkpoint: no checkpoint.pt in {tmp_path / 'no'}: not a checkpoint "
                              "directory (see nanochat core-eval --help)\n")


def test_too_few_items_for_nanochats_bundle_are_refused_before_it_is_downloaded(checkpoint, monkeypatch, capsys):
    """nanochat's bundle shows up to 10 solved examples: 5 items a task could never do, which was said only after
    its download (or its download's retries, offline)."""
    monkeypatch.setattr("nanochat_flyte.cli.core_eval.load_bundle", lambda *args: pytest.fail("downloaded"))
    with pytest.raises(SystemExit) as exit:
        main(["--checkpoint", str(checkpoint), "--max-per-task", "5", "--device", "cpu"])
    assert exit.value.code == 2
    assert "argument --max-per-task: 5 items per task leave nanochat's CORE bundle's 10-shot prompts too few" in \
        capsys.readouterr().err
