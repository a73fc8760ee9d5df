"""Conversations as tokens: nanochat's chat format, shared by SFT, chat evaluation and every chat front end.

A conversation is a list of messages {"role": "user" | "assistant" | "system", "content": str}. A system message
may only come first; it is folded into the first user message (the model has no system turn). After that the
roles alternate, user first. Rendered:

    <|endoftext|> <|user_start|> user text <|user_end|> <|assistant_start|> reply <|assistant_end|> <|user_start|> ...

`<|endoftext|>` starts every document in pretraining, so it starts every conversation too (it is the BOS). Text is
encoded with encode_ordinary: a user who types "<|assistant_end|>" gets those characters, never the token.
The loss mask marks what the model learns to write: the assistant's words and its `<|assistant_end|>`; never the
user's turn, nor `<|assistant_start|>`, which the prompt supplies.
"""

from dataclasses import dataclass

import tiktoken

from nanochat_flyte.config import UserError

ROLES = ("system", "user", "assistant")


class ConversationError(UserError, ValueError):
    """A conversation that cannot be rendered; the message names the message index and the problem."""


@dataclass(frozen=True)
class ChatTokens:
    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int

    @classmethod
    def of(cls, tokenizer: tiktoken.Encoding) -> "ChatTokens":
        if "<|assistant_end|>" not in tokenizer.special_tokens_set:
            raise ConversationError("the tokenizer has no chat tokens (<|user_start|> ...): it was saved by "
                                    "nanochat-flyte 0.1; prepare the data and train the base model again")
        special = tokenizer.encode_single_token
        return cls(bos=tokenizer.eot_token, user_start=special("<|user_start|>"), user_end=special("<|user_end|>"),
                   assistant_start=special("<|assistant_start|>"), assistant_end=special("<|assistant_end|>"))


def normalize(messages: list[dict], *, ends_with: str) -> list[dict]:
    """Messages checked and with a leading system message folded into the first user message. `ends_with` is
    "assistant" for a training conversation and "user" for a prompt that awaits the assistant's reply."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages: must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ConversationError(f"messages[{index}].role: must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ConversationError(f"messages[{index}].content: must be a string")
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
        text = tokenizer.encode_ordinary(message["content"])
        if message["role"] == "user":
            turn = [tokens.user_start, *text, tokens.user_end]
            ids += turn
            mask += [0] * len(turn)
        else:
            ids += [tokens.assistant_start, *text, tokens.assistant_end]
            mask += [0] + [1] * (len(text) + 1)
    return ids, mask


def render_prompt(tokenizer: tiktoken.Encoding, messages: list[dict]) -> list[int]:
    """The ids of a conversation that ends with the user, followed by <|assistant_start|>: what the model
    continues to write its reply (until it emits <|assistant_end|>)."""
    tokens = ChatTokens.of(tokenizer)
    turns = normalize(messages, ends_with="user")
    # the history renders exactly as in training; the new user turn and the reply's opening token follow
    history = render_conversation(tokenizer, turns[:-1])[0] if len(turns) > 1 else [tokens.bos]
    return [*history, tokens.user_start, *tokenizer.encode_ordinary(turns[-1]["content"]), tokens.user_end,
            tokens.assistant_start]
