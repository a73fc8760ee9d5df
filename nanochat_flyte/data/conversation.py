"""Conversations as tokens: nanochat's chat format, shared by SFT, chat evaluation and every chat front end.

A conversation is a list of messages {"role": "user" | "assistant" | "system", "content": str}. A system message
may only come first; it is folded into the first user message (the model has no system turn). After that the
roles alternate, user first. Rendered:

    <|endoftext|> <|user_start|> user text <|user_end|> <|assistant_start|> reply <|assistant_end|> <|user_start|> ...

`<|endoftext|>` starts every document in pretraining, so it starts every conversation too (it is the BOS). Text is
encoded with encode_ordinary: a user who types "<|assistant_end|>" gets those characters, never the token.
The loss mask marks what the model learns to write: the assistant's words and its `<|assistant_end|>`; never the
user's turn, nor `<|assistant_start|>`, which the prompt supplies.

An assistant message's content may also be a list of parts, nanochat's way of writing tool use (calculator.py):
{"type": "text", "text"}, {"type": "python", "text": "48/2"} (a calculation the model writes, rendered as
<|python_start|> 48/2 <|python_end|>, learned) and {"type": "python_output", "text": "24"} (the tool's answer,
<|output_start|> 24 <|output_end|>: in the context, never in the loss, since the engine supplies it). The engine
shows such a call as GSM8K writes it, "<<48/2=24>>": a reply sent back as history (the chat command, the API, the
page) is read back into those parts (calculator_parts), so that the model sees its calls as it wrote them.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import tiktoken

from nanochat_flyte.errors import UserError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")  # of an assistant message's content, when it is a list
# "48/2 = <<48/2=24>>24 clips": a calculation for the calculator, its result; the visible text repeats the result.
# The calculation is never empty: code in a reply (`x <<= 1; y >>= 1`) stays text.
CALCULATOR_ANNOTATION = re.compile(r"<<([^\n<>=][^\n<>]*)=([^\n<>=]*)>>")


class ConversationError(UserError, ValueError):
    """A conversation that cannot be rendered; the message names the message index and the problem."""


@dataclass(frozen=True)
class ChatTokens:
    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tokenizer: tiktoken.Encoding) -> "ChatTokens":
        if "<|assistant_end|>" not in tokenizer.special_tokens_set:
            raise ConversationError("the tokenizer has no chat tokens (<|user_start|> ...): it was saved by "
                                    "nanochat-flyte 0.1; prepare the data and train the base model again")
        special = tokenizer.encode_single_token
        return cls(bos=tokenizer.eot_token, user_start=special("<|user_start|>"), user_end=special("<|user_end|>"),
                   assistant_start=special("<|assistant_start|>"), assistant_end=special("<|assistant_end|>"),
                   python_start=special("<|python_start|>"), python_end=special("<|python_end|>"),
                   output_start=special("<|output_start|>"), output_end=special("<|output_end|>"))


def check_content(message: dict, index: int) -> None:
    content = message.get("content")
    if isinstance(content, str):
        return
    if message.get("role") != "assistant" or not isinstance(content, list):
        raise ConversationError(f"messages[{index}].content: must be a string"
                                + (" or a list of parts" if message.get("role") == "assistant" else ""))
    for number, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ConversationError(f"messages[{index}].content[{number}]: must be {{\"type\": "
                                    f"{' | '.join(PART_TYPES)}, \"text\": string}}")


def normalize(messages: list[dict], *, ends_with: str) -> list[dict]:
    """Messages checked and with a leading system message folded into the first user message. `ends_with` is
    "assistant" for a training conversation and "user" for a prompt that awaits the assistant's reply."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages: must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ConversationError(f"messages[{index}].role: must be one of {', '.join(ROLES)}")
        check_content(message, index)
    turns = [dict(role=m["role"], content=m["content"]) for m in messages]
    if turns[0]["role"] == "system":
        if len(turns) == 1 or turns[1]["role"] != "user":
            raise ConversationError("messages[1].role: a system message must be followed by a user message")
        system, first = turns.pop(0), turns[0]
        first["content"] = f"{system['content']}\n\n{first['content']}" if system["content"] else first["content"]
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)  # report the index in the list the caller sent
            raise ConversationError(f"messages[{index + offset}].role: expected {expected} (turns alternate, "
                                    f"user first, a system message only at the start), got {message['role']}")
    if turns[-1]["role"] != ends_with:
        raise ConversationError(f"messages[{len(messages) - 1}].role: the last message must be from the {ends_with}")
    return turns


def render_conversation(tokenizer: tiktoken.Encoding, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation that ends with the assistant: mask 1 = train on it."""
    tokens = ChatTokens.of(tokenizer)
    ids, mask = [tokens.bos], [0]
    for message in normalize(messages, ends_with="assistant"):
        if message["role"] == "user":
            turn = [tokens.user_start, *tokenizer.encode_ordinary(message["content"]), tokens.user_end]
            ids += turn
            mask += [0] * len(turn)
        else:
            ids.append(tokens.assistant_start)
            mask.append(0)
            for part_ids, learned in assistant_parts(tokenizer, tokens, message["content"]):
                ids += part_ids
                mask += [int(learned)] * len(part_ids)
            ids.append(tokens.assistant_end)
            mask.append(1)
    return ids, mask


def assistant_parts(tokenizer: tiktoken.Encoding, tokens: ChatTokens, content: str | list[dict]
                    ) -> list[tuple[list[int], bool]]:
    """(ids, learned) of each part of an assistant message: the tool's output is the one part not learned."""
    if isinstance(content, str):
        return [(tokenizer.encode_ordinary(content), True)]
    parts = []
    for part in content:
        text = tokenizer.encode_ordinary(part["text"])
        if part["type"] == "python":
            parts.append(([tokens.python_start, *text, tokens.python_end], True))
        elif part["type"] == "python_output":
            parts.append(([tokens.output_start, *text, tokens.output_end], False))
        else:
            parts.append((text, True))
    return parts


def calculator_parts(text: str, is_call: Callable[[str, str], bool] | None = None) -> list[dict]:
    """Text with calculator annotations (a GSM8K solution, a reply as the engine shows it) as assistant content
    parts: each annotation becomes a tool call, the expression for the model to write and the result for the tool to
    give back, as nanochat trains them. is_call(expression, result), where given: which annotations are calls; the
    others (a reply's own `cout << x = y >> z`) stay text."""
    parts, position = [], 0
    for match in CALCULATOR_ANNOTATION.finditer(text):
        if is_call and not is_call(match.group(1), match.group(2)):
            continue
        parts += [{"type": "text", "text": text[position:match.start()]},
                  {"type": "python", "text": match.group(1)}, {"type": "python_output", "text": match.group(2)}]
        position = match.end()
    parts.append({"type": "text", "text": text[position:]})
    return [part for part in parts if part["text"] or part["type"] != "text"]


def render_prompt(tokenizer: tiktoken.Encoding, messages: list[dict],
                  is_call: Callable[[str, str], bool] | None = None) -> list[int]:
    """The ids of a conversation that ends with the user, followed by <|assistant_start|>: what the model
    continues to write its reply (until it emits <|assistant_end|>). is_call: which annotations in the replies are
    calculator calls (calculator_parts)."""
    tokens = ChatTokens.of(tokenizer)
    turns = normalize(messages, ends_with="user")
    # the history renders as in training, the replies' calculator calls as tool calls; the new user turn and the
    # reply's opening token follow
    history = [dict(turn, content=calculator_parts(turn["content"], is_call)) if turn["role"] == "assistant"
               and isinstance(turn["content"], str) else turn for turn in turns[:-1]]
    history = render_conversation(tokenizer, history)[0] if history else [tokens.bos]
    return [*history, tokens.user_start, *tokenizer.encode_ordinary(turns[-1]["content"]), tokens.user_end,
            tokens.assistant_start]
