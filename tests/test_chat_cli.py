"""The terminal chat (`nanochat chat`): one-shot answers for scripts, the interactive multi-turn
chat with /clear and /quit, plain completion for a base checkpoint, one-line errors."""

import io
import re
import subprocess
import sys

import pytest
from chat_server import ROOT
from helpers import NANOCHAT

from nanochat_flyte.cli.chat import main
from nanochat_flyte.errors import UserError
from nanochat_flyte.inference.engine import Engine, SamplingParams

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def chat_engine(chat_checkpoint):
    return Engine.from_checkpoint(chat_checkpoint, "cpu")


def answer_to(engine: Engine, messages: list[dict]) -> str:
    return engine.generate_batch([engine.chat_prompt(messages)], SamplingParams(max_tokens=8))[0].text


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_prompt_answers_once_for_scripts(chat_checkpoint, chat_engine):
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "chat", "--checkpoint", chat_checkpoint.as_uri(),
                             "--prompt", "Hello there", *GREEDY], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == answer_to(chat_engine, [user("Hello there")]) + "\n"
    assert "(cut at the token limit)" in result.stderr  # on stderr: stdout holds the answer only


def test_interactive_chat_keeps_the_conversation_until_clear(chat_checkpoint, chat_engine, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nTell me more\n/clear\nTell me more\n/quit\n"))
    sent, render = [], Engine.chat_prompt
    monkeypatch.setattr(Engine, "chat_prompt", lambda engine, messages: sent.append(list(messages)) or render(
        engine, messages))  # what the CLI hands the engine: this tiny model may answer alike with or without history
    main(["--checkpoint", str(chat_checkpoint), *GREEDY])
    out = capsys.readouterr().out
    first = answer_to(chat_engine, [user("Hello there")])
    second = answer_to(chat_engine, [user("Hello there"), {"role": "assistant", "content": first},
                                     user("Tell me more")])
    fresh = answer_to(chat_engine, [user("Tell me more")])  # after /clear, without the earlier turns
    assert out.splitlines()[0] == "nanochat: chat checkpoint, context 256 tokens. /clear starts over, /quit leaves."
    assert re.findall(r"Assistant: (.*)", out) == [first, second, fresh]  # (input() prints "You: " unechoed)
    assert sent[:3] == [[user("Hello there")], [user("Hello there"), {"role": "assistant", "content": first},
                                                user("Tell me more")], [user("Tell me more")]]
    assert "(new conversation)" in out and "BASE checkpoint" not in out


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on_without_it(chat_checkpoint, chat_engine, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nTell me more\n/quit\n"))
    sent, render, decode = [], Engine.chat_prompt, Engine.decode
    monkeypatch.setattr(Engine, "chat_prompt", lambda engine, messages: sent.append(list(messages)) or render(
        engine, messages))

    def interrupted_once(engine, sequence):  # Ctrl-C after the first answer's first piece of text
        for number, delta in enumerate(decode(engine, sequence)):
            yield delta
            if number == 1 and len(sent) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "decode", interrupted_once)
    main(["--checkpoint", str(chat_checkpoint), *GREEDY])
    out = capsys.readouterr().out
    assert "\n(stopped)\n" in out
    assert sent[:2] == [[user("Hello there")], [user("Tell me more")]]  # the stopped turn left the conversation
    assert re.findall(r"Assistant: (.*)", out)[1] == answer_to(chat_engine, [user("Tell me more")])


def test_end_of_input_leaves_the_chat(chat_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))  # Ctrl-D after one message
    main(["--checkpoint", str(chat_checkpoint), *GREEDY])
    assert capsys.readouterr().out.count("Assistant: ") == 1


def test_a_base_checkpoint_says_it_continues_plain_text(base_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The river\n/quit\n"))
    main(["--checkpoint", str(base_checkpoint), *GREEDY])
    out = capsys.readouterr().out
    assert "this is a BASE checkpoint (no chat fine-tuning)" in out
    base = Engine.from_checkpoint(base_checkpoint, "cpu")
    assert f"Assistant: {base.complete('The river', SamplingParams(max_tokens=8)).text}\n" in out


def test_a_conversation_longer_than_the_context_is_refused_in_one_line(chat_checkpoint, chat_engine, monkeypatch,
                                                                       capsys):
    long = "The cat sees a small boat. " * 80
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\nHello there\n/quit\n"))
    main(["--checkpoint", str(chat_checkpoint), *GREEDY])
    out = capsys.readouterr().out
    assert re.search(r"\nerror: prompt: \d+ tokens leave no room in the model's context of 256 tokens; /clear starts "
                     r"a new conversation\n", out)
    # the chat goes on without the long message: the next one is answered as the first of the conversation
    assert re.findall(r"Assistant: (.*)", out)[-1] == answer_to(chat_engine, [user("Hello there")])


@pytest.mark.parametrize("module, usage_args, usage_error", [
    ("chat", ["--prompt", "Hi"], "the following arguments are required: --checkpoint"),
    ("serve", ["--checkpoint", "CKPT", "--port", "65536"], "--port must be 0..65535, got 65536"),
])
def test_usage_errors_and_missing_checkpoints_give_one_line_and_status_2(tmp_path, module, usage_args, usage_error):
    def front_end(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([NANOCHAT, module, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    missing = front_end("--checkpoint", str(tmp_path), *(["--prompt", "Hi"] if module == "chat" else ["--port", "0"]))
    assert (missing.returncode, missing.stderr) == (2, f"error: argument --checkpoint: no checkpoint.pt in {tmp_path}: "
                                                       f"not a checkpoint directory (see nanochat {module} --help)\n")
    usage = front_end(*[str(tmp_path) if arg == "CKPT" else arg for arg in usage_args])
    assert (usage.returncode, usage.stderr) == (2, f"error: {usage_error} (see nanochat {module} --help)\n")


@pytest.mark.parametrize("flags, problem", [
    (["--max-tokens", "0"], "--max-tokens: must be an integer >= 1, got 0"),
    (["--seed", "99999999999999999999", "--temperature", "1"],
     "argument --seed: must be an integer from 0 to 2**63 - 1, got '99999999999999999999'"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**63 - 1, got '-1'"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got 'inf'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got 'nan'"),
    (["--prompt", " \n"], "--prompt: give a message to answer; it is empty"),
], ids=["max-tokens-0", "seed-too-large", "seed-negative", "temperature-inf", "temperature-nan", "empty-prompt"])
def test_bad_flags_are_refused_in_one_line_before_loading(tmp_path, capsys, flags, problem):
    with pytest.raises(SystemExit) as exit_:  # no checkpoint there: a refusal after loading would not get this far
        main(["--checkpoint", str(tmp_path), *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {problem} (see nanochat chat --help)\n"


def test_a_prompt_longer_than_the_context_is_refused_naming_the_flag(chat_checkpoint):
    with pytest.raises(UserError, match=r"^--prompt: \d+ tokens leave no room in the model's context of 256 tokens$"):
        main(["--checkpoint", str(chat_checkpoint), "--prompt", "The cat sees a small boat. " * 80, *GREEDY])
