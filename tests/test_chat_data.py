"""Hub rows -> conversations and evaluation items; the SFT mixture; all against a local hub (tests/hub_server.py)."""

import hashlib
import json
from collections import Counter

import pytest
import regex

from nanochat_flyte.config import ChatConfig
from nanochat_flyte.data.chat_data import (
    EVAL_SOURCES,
    MAX_MIXTURE,
    BadRow,
    arc_question,
    check_hub_endpoint,
    check_prepared_for,
    gsm8k_conversation,
    gsm8k_final_answer,
    gsm8k_item,
    load_eval_items,
    mmlu_conversation,
    prepare_eval_data,
    prepare_sft_data,
    read_jsonl,
    render_multiple_choice,
    renderable,
    smoltalk_conversation,
)
from nanochat_flyte.data.conversation import calculator_parts, render_conversation
from nanochat_flyte.data.hub import split_cache_dir
from nanochat_flyte.data.tokenizer import BPE_SPLIT_PATTERN, gpt2_tokenizer
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.files import write_bytes_atomically
from tests.hub_server import (
    GSM8K_SCHEMA,
    HUB_SPLITS,
    HUMANEVAL_SCHEMA,
    MMLU_SCHEMA,
    SMOLTALK_SCHEMA,
    serve_hub,
    split_path,
    write_split,
)

SMOLTALK_TRAIN = ("HuggingFaceTB/smol-smoltalk", "default", "train")
SMOLTALK_TEST = ("HuggingFaceTB/smol-smoltalk", "default", "test")
HUMANEVAL = ("openai/openai_humaneval", "openai_humaneval", "test")
MMLU_AUX = ("cais/mmlu", "all", "auxiliary_train")
GSM8K_TRAIN = ("openai/gsm8k", "main", "train")


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def lines_of(path):
    return path.read_text().splitlines()

# ----------------------------------------------------------------------------- converters, by hand


def test_multiple_choice_renders_exactly():
    assert render_multiple_choice("What is 2 + 2?", ["3", "4", "5"], ["A", "B", "C"]) == (
        "Multiple choice question: What is 2 + 2?\n"
        "\n"
        "Choices:\n"
        "- 3 (A)\n"
        "- 4 (B)\n"
        "- 5 (C)\n"
        "\n"
        "Answer with the letter of the correct choice only.")


def test_each_letter_is_the_token_the_assistant_answers_with():
    gpt2 = gpt2_tokenizer()
    text = render_multiple_choice("Which?", ["red", "green", "blue", "cyan"], list("ABCD"))
    for letter in "ABCD":
        (answer_token,) = gpt2.encode_ordinary(letter)
        assert answer_token in gpt2.encode_ordinary(text)
        assert letter in regex.findall(BPE_SPLIT_PATTERN, text)  # our BPE can never merge it with its neighbours


def test_mmlu_row_becomes_a_question_answered_with_a_letter():
    row = {"question": "What is the SI unit of force?", "subject": "", "choices": ["Joule", "Newton", "Watt", "Pascal"],
           "answer": 1}
    assert mmlu_conversation(row, 0) == {
        "messages": [user(render_multiple_choice(row["question"], row["choices"], list("ABCD"))), assistant("B")],
        "source": "mmlu"}
    with pytest.raises(BadRow):
        mmlu_conversation(row | {"answer": 4}, 0)


def test_mmlu_and_arc_evaluation_items():
    mmlu = EVAL_SOURCES["mmlu"].convert({"question": "Q?", "subject": "astronomy", "choices": ["a", "b", "c", "d"],
                                         "answer": 3}, 7)
    assert mmlu == {"task": "mmlu", "id": "mmlu/7", "messages": [user(render_multiple_choice("Q?", list("abcd"),
                                                                                              list("ABCD")))],
                    "letters": ["A", "B", "C", "D"], "answer": "D", "subject": "astronomy"}
    arc_row = {"id": "Mercury_7175875", "question": "Which is a renewable resource?",
               "choices": {"text": ["coal", "wind", "oil"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    arc = EVAL_SOURCES["arc_challenge"].convert(arc_row, 0)
    assert arc == {"task": "arc_challenge", "id": "Mercury_7175875",
                   "messages": [user(render_multiple_choice(arc_row["question"], ["coal", "wind", "oil"],
                                                            ["A", "B", "C"]))],
                   "letters": ["A", "B", "C"], "answer": "B"}


def test_arc_numeric_labels_and_five_choices_become_letters_by_position():
    numeric = {"question": "Q?", "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]},
               "answerKey": "3"}
    content, letters, answer = arc_question(numeric)
    assert letters == ["A", "B", "C", "D"] and answer == "C" and "- y (C)" in content
    five = {"question": "Q?", "choices": {"text": list("vwxyz"), "label": list("ABCDE")}, "answerKey": "E"}
    assert arc_question(five)[1:] == (list("ABCDE"), "E")
    with pytest.raises(BadRow, match="answerKey 'F'"):
        arc_question(five | {"answerKey": "F"})


def test_gsm8k_calculations_become_calculator_calls_and_the_final_line_is_kept():
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert calculator_parts(solution) == [
        {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert calculator_parts("<<2*3=6>>6\n#### 6") == [  # no empty text part before a leading call
        {"type": "python", "text": "2*3"}, {"type": "python_output", "text": "6"},
        {"type": "text", "text": "6\n#### 6"}]
    shift = "In C, `x <<= 1; y >>= 1` doubles x and halves y."  # code in a reply (as history): no calculation
    assert calculator_parts(shift) == [{"type": "text", "text": shift}]
    row = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                       "May. How many clips did Natalia sell altogether in April and May?", "answer": solution}
    assert gsm8k_conversation(row, 0) == {"messages": [user(row["question"]), assistant(calculator_parts(solution))],
                                          "source": "gsm8k"}
    assert gsm8k_item(row, 5) == {"task": "gsm8k", "id": "gsm8k/5", "messages": [user(row["question"])],
                                  "answer": "72"}


@pytest.mark.parametrize("final, number", [("#### 18", "18"), ("#### 1,200", "1200"), ("#### -3", "-3"),
                                           ("####  0.5", "0.5"), ("#### 2,125,000", "2125000"),
                                           ("#### -1,050", "-1050")])
def test_gsm8k_final_answer(final, number):
    assert gsm8k_final_answer(f"It costs 3 * 6 = $<<3*6=18>>18.\n{final}") == number


def test_gsm8k_without_a_final_answer_is_a_bad_row():
    with pytest.raises(BadRow, match="no final answer"):
        gsm8k_conversation({"question": "Q", "answer": "It is 4."}, 0)


def test_smoltalk_rows_keep_their_messages_and_broken_ones_are_bad_rows():
    system = [{"content": "Be brief.", "role": "system"}, {"content": "Hi", "role": "user"},
              {"content": "Hello!", "role": "assistant"}]
    assert smoltalk_conversation({"messages": system}, 0) == {
        "messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")], "source": "smoltalk"}
    for broken in ([user("Hi")], [user("Hi"), user("Again"), assistant("Yes")], [assistant("Hi")], [],
                   [user("Hi"), assistant("Hello"), {"role": "system", "content": "late"}, assistant("x")]):
        with pytest.raises(BadRow):
            renderable(smoltalk_conversation({"messages": broken}, 0))  # as convert_split takes each row


def test_humaneval_item_carries_what_the_sandbox_needs_and_the_canonical_solution_passes(hub_server, tmp_path):
    items = load_eval_items("humaneval")
    assert len(items) == hub_server.rows[("openai/openai_humaneval", "openai_humaneval", "test")]
    for item in items:
        assert item["task"] == "humaneval" and item["id"].startswith("HumanEval/")
        assert item["messages"] == [user(item["prompt"])]
        namespace = {}
        exec(item["prompt"] + item["canonical_solution"] + item["test"], namespace)
        namespace["check"](namespace[item["entry_point"]])
        wrong = {}
        exec(item["prompt"] + "    return None\n" + item["test"], wrong)
        with pytest.raises(AssertionError):  # the test can fail
            wrong["check"](wrong[item["entry_point"]])

# ----------------------------------------------------------------------------- evaluation sets


def test_prepare_eval_data_writes_each_task_and_a_manifest(hub_server, tmp_path):
    tasks = list(EVAL_SOURCES)
    manifest = prepare_eval_data(tasks, tmp_path / "eval")
    for task in tasks:
        source = EVAL_SOURCES[task]
        rows = hub_server.rows[(source.repo, source.subset, source.split)]
        items = read_jsonl(tmp_path / "eval" / f"{task}.jsonl")
        assert len(items) == rows and {item["task"] for item in items} == {task}
        assert len({item["id"] for item in items}) == rows
        assert manifest["tasks"][task]["items"] == rows and manifest["tasks"][task]["skipped"] == 0
        assert items == load_eval_items(task)
    for item in read_jsonl(tmp_path / "eval" / "arc_easy.jsonl") + read_jsonl(tmp_path / "eval" / "mmlu.jsonl"):
        assert item["answer"] in item["letters"] and 3 <= len(item["letters"]) <= 5
    gsm8k_rows = HUB_SPLITS[("openai/gsm8k", "main", "test")][1]
    assert [item["answer"] for item in read_jsonl(tmp_path / "eval" / "gsm8k.jsonl")] == \
           [row["answer"].rsplit("#### ", 1)[1] for row in gsm8k_rows]
    assert json.loads((tmp_path / "eval" / "manifest.json").read_text()) == manifest


def test_an_unknown_task_fails_before_any_download(hub_server, tmp_path):
    with pytest.raises(ConfigError, match=r"^ChatConfig.eval_tasks: unknown task 'hellaswag'; choose from arc_easy"):
        prepare_eval_data(["gsm8k", "hellaswag"], tmp_path / "eval")
    with pytest.raises(ConfigError, match="eval_tasks"):
        load_eval_items("arc")
    assert hub_server.requests == []

# ----------------------------------------------------------------------------- the SFT mixture


def test_the_default_mixture_its_manifest_and_a_relaunch_that_downloads_nothing(hub_server, tmp_path):
    manifest = prepare_sft_data(ChatConfig(), tmp_path / "sft")
    train = read_jsonl(tmp_path / "sft" / "train.jsonl")
    smoltalk, mmlu, gsm8k = (hub_server.rows[key] for key in (SMOLTALK_TRAIN, MMLU_AUX, GSM8K_TRAIN))
    assert Counter(c["source"] for c in train) == {"smoltalk": smoltalk, "mmlu": 3 * mmlu, "gsm8k": 4 * gsm8k}
    assert [c["source"] for c in train[:20]] != sorted(c["source"] for c in train[:20])  # shuffled together

    assert manifest == json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["train_conversations"] == len(train) == smoltalk + 3 * mmlu + 4 * gsm8k
    assert manifest["endpoint"] == hub_server.url
    mmlu_record = manifest["sources"]["mmlu"]
    assert {k: mmlu_record[k] for k in ("repo", "subset", "split", "rows", "skipped", "epochs",
                                        "conversations_per_epoch", "conversations")} == {
        "repo": "cais/mmlu", "subset": "all", "split": "auxiliary_train", "rows": mmlu, "skipped": 0, "epochs": 3.0,
        "conversations_per_epoch": mmlu, "conversations": 3 * mmlu}
    smoltalk_files = manifest["sources"]["smoltalk"]["files"]
    assert [f["url"] for f in smoltalk_files] == [f"{hub_server.url}{split_path(*SMOLTALK_TRAIN)}/{n}.parquet"
                                                  for n in (0, 1)]
    cached = split_cache_dir(*SMOLTALK_TRAIN)  # the fixture's NANOCHAT_FLYTE_CACHE
    assert [f["sha256"] for f in smoltalk_files] == [hashlib.sha256((cached / f["file"]).read_bytes()).hexdigest()
                                                     for f in smoltalk_files]
    assert manifest["val"]["split"] == "test" and manifest["val_conversations"] == hub_server.rows[SMOLTALK_TEST]

    asked = len(hub_server.requests)
    again = prepare_sft_data(ChatConfig(), tmp_path / "again")
    assert len(hub_server.requests) == asked  # everything came from the cache
    assert again == manifest and lines_of(tmp_path / "again" / "train.jsonl") == lines_of(tmp_path / "sft" /
                                                                                        "train.jsonl")


def test_three_epochs_of_mmlu_give_each_row_three_times_and_a_zero_epoch_source_is_not_downloaded(hub_server,
                                                                                                  tmp_path):
    prepare_sft_data(ChatConfig(smoltalk_epochs=0, mmlu_epochs=3, gsm8k_epochs=0), tmp_path / "sft")
    counts = Counter(lines_of(tmp_path / "sft" / "train.jsonl"))
    assert len(counts) == hub_server.rows[MMLU_AUX] and set(counts.values()) == {3}
    assert not hub_server.requests_for(split_path(*GSM8K_TRAIN))
    assert not hub_server.requests_for(split_path(*SMOLTALK_TRAIN))


def test_a_fractional_epoch_takes_a_seeded_subset(hub_server, tmp_path):
    def mixture(seed, out):
        manifest = prepare_sft_data(ChatConfig(smoltalk_epochs=0, mmlu_epochs=1.5, gsm8k_epochs=0.25, seed=seed),
                                    tmp_path / out)
        return manifest, Counter(lines_of(tmp_path / out / "train.jsonl"))

    manifest, counts = mixture(1, "a")
    mmlu, gsm8k = hub_server.rows[MMLU_AUX], hub_server.rows[GSM8K_TRAIN]
    assert manifest["sources"]["mmlu"]["conversations"] == mmlu + round(0.5 * mmlu)
    assert manifest["sources"]["gsm8k"]["conversations"] == round(0.25 * gsm8k)
    twice = {line for line, n in counts.items() if n == 2}
    assert len(twice) == round(0.5 * mmlu) and max(counts.values()) == 2
    assert mixture(1, "b")[1] == counts  # the same subset every time
    assert {line for line, n in mixture(2, "c")[1].items() if n == 2} != twice  # another seed, another subset


def test_max_conversations_keeps_the_same_seeded_subset(hub_server, tmp_path):
    prepare_sft_data(ChatConfig(max_conversations=50), tmp_path / "a")
    prepare_sft_data(ChatConfig(max_conversations=50), tmp_path / "b")
    prepare_sft_data(ChatConfig(max_conversations=50, seed=7), tmp_path / "c")
    subset = lines_of(tmp_path / "a" / "train.jsonl")
    assert len(subset) == 50 and subset == lines_of(tmp_path / "b" / "train.jsonl")
    assert subset != lines_of(tmp_path / "c" / "train.jsonl")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert sum(s["conversations"] for s in manifest["sources"].values()) == manifest["train_conversations"] == 50


def test_a_mixture_too_large_to_hold_fails_in_one_line_before_its_download(hub_server, tmp_path):
    """Its copies are listed in memory: a billion epochs were a MemoryError after the checks had passed."""
    with pytest.raises(ConfigError, match=r"^ChatConfig.smoltalk_epochs: 1e\+09 epochs make a mixture of at least "
                                          r"1,000,000,000 conversations, more than the 10,000,000 it may hold; give "
                                          r"fewer epochs$"):
        prepare_sft_data(ChatConfig(smoltalk_epochs=1e9, max_conversations=200), tmp_path / "sft")
    assert hub_server.requests == [] and not (tmp_path / "sft").exists()
    # one whose size only its rows tell: after that source's download, before the next one's
    epochs = MAX_MIXTURE // hub_server.rows[MMLU_AUX] + 1
    size = hub_server.rows[SMOLTALK_TRAIN] + epochs * hub_server.rows[MMLU_AUX]
    with pytest.raises(ConfigError, match=rf"^ChatConfig.mmlu_epochs: {epochs} epochs make a mixture of at least "
                                          rf"{size:,} conversations, more than"):
        prepare_sft_data(ChatConfig(mmlu_epochs=epochs), tmp_path / "sft")
    assert not hub_server.requests_for(split_path(*GSM8K_TRAIN)) and not (tmp_path / "sft").exists()


def test_a_source_whose_epochs_make_no_conversation_fails_after_its_download_and_writes_nothing(hub_server,
                                                                                               tmp_path):
    gsm8k = hub_server.rows[GSM8K_TRAIN]
    with pytest.raises(ConfigError, match=rf"^ChatConfig\.gsm8k_epochs: {0.4 / gsm8k:g} epochs of gsm8k's "
                                          rf"{gsm8k:,} conversations make none"):
        prepare_sft_data(ChatConfig(smoltalk_epochs=0, mmlu_epochs=0, gsm8k_epochs=0.4 / gsm8k), tmp_path / "sft")
    assert not (tmp_path / "sft").exists()


def test_prepared_data_must_hold_the_validation_conversations_asked_for(hub_server, tmp_path):
    """--data-dir: SFT validates on the conversations the folder holds, and records the config's number."""
    manifest = prepare_sft_data(ChatConfig(max_conversations=20), tmp_path / "sft")  # asks 1,000: gets all there are
    held = manifest["val_conversations"]
    assert held == manifest["val"]["rows"] - manifest["val"]["skipped"] < 1000
    check_prepared_for(ChatConfig(max_conversations=20, val_conversations=held + 7), manifest, tmp_path / "sft")
    with pytest.raises(ConfigError, match=rf"^ChatConfig\.val_conversations: 2 differs from the {held} that the data "):
        check_prepared_for(ChatConfig(max_conversations=20, val_conversations=2), manifest, tmp_path / "sft")


def test_validation_conversations_come_from_the_smoltalk_test_split(hub_server, tmp_path):
    prepare_sft_data(ChatConfig(val_conversations=10), tmp_path / "sft")
    val = read_jsonl(tmp_path / "sft" / "val.jsonl")
    test_split = [smoltalk_conversation(row, i) for i, row in enumerate(HUB_SPLITS[SMOLTALK_TEST][1])]
    train_split = [smoltalk_conversation(row, i) for i, row in enumerate(HUB_SPLITS[SMOLTALK_TRAIN][1])]
    assert len(val) == 10 and all(c in test_split for c in val)
    assert not any(c in train_split for c in val)


def test_every_conversation_renders_with_trained_tokens(hub_server, tmp_path):
    gpt2 = gpt2_tokenizer()
    prepare_sft_data(ChatConfig(), tmp_path / "sft")
    conversations = read_jsonl(tmp_path / "sft" / "train.jsonl") + read_jsonl(tmp_path / "sft" / "val.jsonl")
    for conversation in conversations:
        ids, mask = render_conversation(gpt2, conversation["messages"])
        assert len(ids) == len(mask) and sum(mask) >= 1
    assert {c["source"] for c in conversations} == {"smoltalk", "mmlu", "gsm8k"}


def test_rows_that_break_the_chat_rules_are_skipped_and_counted(hub_server, tmp_path):
    rows = HUB_SPLITS[SMOLTALK_TRAIN][1] + [
        {"messages": [{"content": "Hello?", "role": "user"}], "source": "smol-magpie-ultra"},
        {"messages": [{"content": "A", "role": "user"}, {"content": "B", "role": "user"},
                      {"content": "C", "role": "assistant"}], "source": "smol-magpie-ultra"}]
    write_split(hub_server.directory, *SMOLTALK_TRAIN, rows, SMOLTALK_SCHEMA, num_files=2)
    manifest = prepare_sft_data(ChatConfig(mmlu_epochs=0, gsm8k_epochs=0), tmp_path / "sft")
    record = manifest["sources"]["smoltalk"]
    assert record["rows"] == len(rows) and record["skipped"] == 2 and record["conversations"] == len(rows) - 2
    assert record["skip_reasons"] == {"messages[0].role: the last message must be from the assistant": 1,
                                      "messages[1].role: expected assistant (turns alternate, user first, a system "
                                      "message only at the start), got user": 1}
    assert len(lines_of(tmp_path / "sft" / "train.jsonl")) == len(rows) - 2


def test_rows_with_a_null_field_are_skipped_and_counted_not_a_crash(hub_server, tmp_path):
    """The parquet schemas allow nulls: a mirror's row with a null field is one skipped row, not a failed stage."""
    mmlu = HUB_SPLITS[MMLU_AUX][1] + [{"question": "Q?", "subject": "", "choices": None, "answer": 0},
                                      {"question": None, "subject": "", "choices": ["a", "b"], "answer": 0},
                                      {"question": "Q?", "subject": "", "choices": ["a", None], "answer": 0}]
    gsm8k = HUB_SPLITS[GSM8K_TRAIN][1] + [{"question": "Q?", "answer": None}, {"question": None, "answer": "#### 2"}]
    smoltalk = HUB_SPLITS[SMOLTALK_TRAIN][1] + [{"messages": None, "source": "x"},
                                                {"messages": [{"content": None, "role": "user"},
                                                              {"content": "B", "role": "assistant"}], "source": "x"}]
    write_split(hub_server.directory, *MMLU_AUX, mmlu, MMLU_SCHEMA)
    write_split(hub_server.directory, *GSM8K_TRAIN, gsm8k, GSM8K_SCHEMA)
    write_split(hub_server.directory, *SMOLTALK_TRAIN, smoltalk, SMOLTALK_SCHEMA)
    manifest = prepare_sft_data(ChatConfig(), tmp_path / "sft")
    for source, bad in (("mmlu", 3), ("gsm8k", 2), ("smoltalk", 2)):
        record = manifest["sources"][source]
        assert record["skipped"] == bad, record
    assert "None" not in (tmp_path / "sft" / "train.jsonl").read_text()  # (a null choice was written as "None")
    # an evaluation item whose prompt would not render, or whose program could not be put together
    humaneval = HUB_SPLITS[HUMANEVAL][1]
    write_split(hub_server.directory, *HUMANEVAL, [humaneval[0] | {"prompt": None}, humaneval[1] | {"test": None},
                                                   *humaneval[2:]], HUMANEVAL_SCHEMA)
    assert [item["id"] for item in load_eval_items("humaneval")] == [row["task_id"] for row in humaneval[2:]]


def test_bad_config_fails_before_any_download(hub_server, tmp_path):
    with pytest.raises(ConfigError, match=r"^ChatConfig.mmlu_epochs: "):
        prepare_sft_data(ChatConfig(mmlu_epochs=-1), tmp_path / "sft")
    assert hub_server.requests == [] and not (tmp_path / "sft").exists()


def test_an_interrupted_write_leaves_no_file_that_looks_whole(tmp_path):
    def lines():
        yield b"one\n"
        raise KeyboardInterrupt  # the task is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomically(tmp_path / "train.jsonl", lines())
    assert not (tmp_path / "train.jsonl").exists()

# ----------------------------------------------------------------------------- the endpoint check


def test_check_hub_endpoint(hub_server, tmp_path, monkeypatch):
    check_hub_endpoint(ChatConfig())  # HF_ENDPOINT: the local hub
    check_hub_endpoint(ChatConfig(hf_endpoint=hub_server.url))
    with serve_hub(tmp_path / "empty") as empty:  # answers, but has no such dataset
        with pytest.raises(ConfigError, match=rf"^ChatConfig.hf_endpoint: {empty.url} does not answer the hub's "
                                              rf"parquet listing API \({empty.url}/api/datasets/HuggingFaceTB/"
                                              rf"smol-smoltalk/parquet/default/test\): not found \(HTTP 404\); "
                                              rf"without the hub, point hf_endpoint or \$HF_ENDPOINT at a mirror "
                                              rf"\(README: Offline and mirrors\)$"):
            check_hub_endpoint(ChatConfig(hf_endpoint=empty.url))
        closed = empty.url
    refused = r"^ChatConfig.hf_endpoint: .*Connection refused.*\(gave up after 2 attempts\); without the hub, .*mirror"
    with pytest.raises(ConfigError, match=refused):
        check_hub_endpoint(ChatConfig(hf_endpoint=closed))  # nothing listens there any more
