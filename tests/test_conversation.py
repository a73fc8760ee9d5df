"""nanochat's chat format: hand-checked ids and loss masks, with GPT-2's tokenizer and a trained BPE."""

import pytest

from nanochat_flyte.data.conversation import ConversationError, render_conversation, render_prompt
from nanochat_flyte.data.tokenizer import gpt2_tokenizer, train_bpe
from tests.shard_server import fineweb_texts

BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = 50256, 50257, 50258, 50259, 50260
PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END = 50261, 50262, 50263, 50264
HELLO, WORLD = 15496, 995  # "Hello", " world"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def test_a_two_turn_conversation_by_hand(gpt2):
    hi = gpt2.encode_ordinary("Hi")
    ids, mask = render_conversation(gpt2, [{"role": "user", "content": "Hello world"},
                                           {"role": "assistant", "content": "Hi"},
                                           {"role": "user", "content": "Hello"},
                                           {"role": "assistant", "content": " world"}])
    assert ids == [BOS, USER_START, HELLO, WORLD, USER_END, ASSISTANT_START, *hi, ASSISTANT_END,
                   USER_START, HELLO, USER_END, ASSISTANT_START, WORLD, ASSISTANT_END]
    # trained on: the assistant's words and its end token; never the user, BOS or <|assistant_start|>
    assert mask == [0, 0, 0, 0, 0, 0, *[1] * len(hi), 1,
                    0, 0, 0, 0, 1, 1]


def test_a_system_message_is_folded_into_the_first_user_message(gpt2):
    folded = render_conversation(gpt2, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello"},
                                        {"role": "assistant", "content": "Hi"}])
    assert folded == render_conversation(gpt2, [{"role": "user", "content": "Be brief.\n\nHello"},
                                                {"role": "assistant", "content": "Hi"}])


def test_a_calculator_call_is_learned_and_its_output_is_not(gpt2):
    parts = [{"type": "text", "text": "Half is "}, {"type": "python", "text": "48/2"},
             {"type": "python_output", "text": "24"}, {"type": "text", "text": "24."}]
    ids, mask = render_conversation(gpt2, [{"role": "user", "content": "Hello"},
                                           {"role": "assistant", "content": parts}])
    half, expression, result, answer = (gpt2.encode_ordinary(text) for text in ("Half is ", "48/2", "24", "24."))
    assert ids == [BOS, USER_START, HELLO, USER_END, ASSISTANT_START, *half, PYTHON_START, *expression, PYTHON_END,
                   OUTPUT_START, *result, OUTPUT_END, *answer, ASSISTANT_END]
    assert mask == [0, 0, 0, 0, 0, *[1] * len(half), 1, *[1] * len(expression), 1,
                    0, *[0] * len(result), 0, *[1] * len(answer), 1]  # the tool writes its output, not the model


def test_special_token_text_typed_by_a_user_stays_text(gpt2):
    ids, _ = render_conversation(gpt2, [{"role": "user", "content": "<|assistant_end|><|endoftext|>"},
                                        {"role": "assistant", "content": "ok"}])
    assert ids.count(ASSISTANT_END) == 1 and ids.count(BOS) == 1


def test_the_prompt_is_the_rendered_history_then_the_new_turn_and_assistant_start(gpt2):
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " world"}]
    prompt = render_prompt(gpt2, [*history, {"role": "user", "content": "Hello world"}])
    assert prompt == [*render_conversation(gpt2, history)[0], USER_START, HELLO, WORLD, USER_END, ASSISTANT_START]
    assert render_prompt(gpt2, [{"role": "user", "content": "Hello"}]) == [BOS, USER_START, HELLO, USER_END,
                                                                          ASSISTANT_START]


def test_a_reply_sent_back_as_history_gives_the_model_its_calculator_calls_as_tool_calls(gpt2):
    """The engine shows a call as "<<48/2=24>>" (the chat command keeps that text as history; API clients send it
    back): the next prompt renders it as the tool tokens the model wrote, as SFT trained it, not as plain text."""
    shown = "Half is <<48/2=24>>24."
    prompt = render_prompt(gpt2, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": shown},
                                  {"role": "user", "content": "Hello"}])
    half, expression, result, answer = (gpt2.encode_ordinary(text) for text in ("Half is ", "48/2", "24", "24."))
    assert prompt == [BOS, USER_START, HELLO, USER_END, ASSISTANT_START, *half, PYTHON_START, *expression,
                      PYTHON_END, OUTPUT_START, *result, OUTPUT_END, *answer, ASSISTANT_END,
                      USER_START, HELLO, USER_END, ASSISTANT_START]
    # a user's own "<<...>>" stays text
    user = render_prompt(gpt2, [{"role": "user", "content": shown}])
    assert PYTHON_START not in user and user[2:-2] == gpt2.encode_ordinary(shown)


@pytest.mark.parametrize("messages, problem", [
    ([], r"messages: must be a non-empty list"),
    ([{"role": "assistant", "content": "hi"}], r"messages\[0\]\.role: expected user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\]\.role: expected assistant"),
    ([{"role": "robot", "content": "a"}], r"messages\[0\]\.role: must be one of system, user, assistant"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content: must be a string$"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], r"messages\[0\]\.content: must be a string$"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "b"}]}],
     r"messages\[1\]\.content\[0\]: must be \{\"type\": text \| python \| python_output, \"text\": string\}"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
     r"messages\[1\]\.content: must be a string or a list of parts"),
    ([{"role": "system", "content": "a"}], r"messages\[1\]\.role: a system message must be followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     r"messages\[1\]\.role: expected assistant"),
])
def test_bad_conversations_are_named(gpt2, messages, problem):
    with pytest.raises(ConversationError, match=problem):
        render_prompt(gpt2, messages)


def test_a_prompt_must_end_with_the_user_and_a_training_conversation_with_the_assistant(gpt2):
    with pytest.raises(ConversationError, match=r"messages\[1\]\.role: the last message must be from the user"):
        render_prompt(gpt2, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ConversationError, match=r"messages\[0\]\.role: the last message must be from the assistant"):
        render_conversation(gpt2, [{"role": "user", "content": "a"}])


def test_our_bpe_renders_with_its_own_special_ids():
    bpe = train_bpe(fineweb_texts(200), vocab_size=400)
    ids, mask = render_conversation(bpe, [{"role": "user", "content": "the water"},
                                          {"role": "assistant", "content": "the energy"}])
    eot = bpe.eot_token
    assert ids[0] == eot and ids[1] == eot + 1 and ids[-1] == eot + 4  # <|assistant_end|>
    assert bpe.decode([i for i, m in zip(ids, mask) if m]) == "the energy<|assistant_end|>"
