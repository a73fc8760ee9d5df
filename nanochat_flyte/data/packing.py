"""Conversations as training rows: rendered once with their loss masks, then packed into rows of max_seq_len + 1.

Rendering (conversation.render_conversation) gives every conversation its token ids and a mask that marks what the
assistant wrote. The stream's conversations are packed a block of BLOCK at a time, best fit: the longest first,
each into the row it fills best, or a new row. Filling rows in stream order instead, where the next conversation
that does not fit ends a row, left a fifth of every row as padding; best fit leaves a few percent, so an epoch
takes fewer steps (nanochat packs the same way, from a look-ahead of 100). Nothing is cut, except a conversation
longer than a row, which keeps its first row's worth of tokens; every row starts at a conversation's
`<|endoftext|>`. Targets are the next tokens where the mask is set and -1 elsewhere (user turns, padding): the
model's cross-entropy ignores -1, so the loss is the assistant's tokens alone.

The stream visits every conversation once per epoch, in a fresh order drawn from the seed each epoch. The loader's
position is two numbers, the block being read (the conversations before it) and the rows of it already taken: a
resumed run packs exactly the rows it would have packed. A micro-batch is the next world_size * batch_size rows;
rank r takes the r-th slice.
"""

import math
from collections.abc import Iterable

import numpy as np
import tiktoken
import torch

from nanochat_flyte.data.conversation import ChatTokens, render_conversation
from nanochat_flyte.data.dataloader import Order
from nanochat_flyte.errors import ConfigError


class RenderedConversations:
    """Token ids and loss masks of many conversations, in two flat arrays (a Python list of lists of ints would
    take ~7x the memory), each conversation cut to at most max_len tokens."""

    def __init__(self, tokenizer: tiktoken.Encoding, conversations: Iterable[dict], max_len: int):
        self.pad = ChatTokens.of(tokenizer).bos  # any id does: padding positions are never trained on
        tokens, masks, lengths = [], [], []
        self.dropped = 0  # conversations whose assistant tokens all lie past max_len: nothing to learn in a row
        for conversation in conversations:
            ids, mask = render_conversation(tokenizer, conversation["messages"])
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):  # the first token is never a target
                self.dropped += 1
                continue
            tokens.append(np.asarray(ids, dtype=np.int32))
            masks.append(np.asarray(mask, dtype=np.bool_))
            lengths.append(len(ids))
        if not lengths:
            raise ValueError("no conversation has an assistant token within the row length: nothing to train on")
        self.tokens, self.masks = np.concatenate(tokens), np.concatenate(masks)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.starts[index], self.starts[index] + self.lengths[index]
        return self.tokens[start:end], self.masks[start:end]

    @property
    def trained_tokens(self) -> int:
        return int(self.masks.sum())


BLOCK = 100  # conversations packed together: nanochat's look-ahead; enough choice to fill rows to a few percent


def block_rows(lengths: np.ndarray, order: Order, start: int, capacity: int, end: int | None = None
               ) -> tuple[list[list[int]], int]:
    """The rows of the block of conversations at stream positions start.. (BLOCK of them, fewer where the stream
    `end`s or an epoch does: an epoch's rows are epoch_rows'), best fit into rows of `capacity` tokens, and the
    position after the block."""
    epoch_end = (start // order.n + 1) * order.n
    stop = min(start + BLOCK, epoch_end, epoch_end if end is None else end)
    sizes = {order[position]: min(lengths[order[position]], capacity) for position in range(start, stop)}
    rows, free = [], []
    for index in sorted(sizes, key=lambda index: -sizes[index]):  # longest first; ties keep the stream's order
        fitting = [row for row, space in enumerate(free) if space >= sizes[index]]
        if fitting:
            row = min(fitting, key=lambda row: free[row])  # the row it fills best
            rows[row].append(index)
            free[row] -= sizes[index]
        else:
            rows.append([index])
            free.append(capacity - sizes[index])
    return rows, stop


def pack(lengths: np.ndarray, order: Order, position: tuple[int, int], capacity: int, num_rows: int,
         end: int | None = None) -> tuple[list[list[int]], tuple[int, int]]:
    """The next num_rows rows from `position`, (the block's first stream position, its rows already taken), fewer if
    the stream `end`s first: the conversation indices of each row, and the position after them."""
    rows, (start, taken) = [], position
    while len(rows) < num_rows and start != end:
        block, after = block_rows(lengths, order, start, capacity, end)
        added = block[taken:taken + num_rows - len(rows)]
        rows += added
        taken += len(added)
        if taken == len(block):
            start, taken = after, 0
    return rows, (start, taken)


def rows_tensor(conversations: RenderedConversations, rows: list[list[int]], capacity: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 (len(rows), capacity - 1): targets -1 wherever the model is not trained."""
    tokens = np.full((len(rows), capacity), conversations.pad, dtype=np.int64)
    trained = np.zeros((len(rows), capacity), dtype=np.bool_)
    for r, row in enumerate(rows):
        used = 0
        for index in row:
            ids, mask = conversations.get(index)
            ids, mask = ids[:capacity - used], mask[:capacity - used]
            tokens[r, used:used + len(ids)], trained[r, used:used + len(ids)] = ids, mask
            used += len(ids)
    targets = np.where(trained[:, 1:], tokens[:, 1:], -1)
    return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets)


class ConversationLoader:
    """Yields (inputs, targets) int64 tensors of shape (batch_size, seq_len) on `device`; resumable, DDP-sharded."""

    def __init__(self, conversations: RenderedConversations, batch_size: int, seq_len: int, *, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        self.conversations, self.batch_size, self.capacity = conversations, batch_size, seq_len + 1
        self.order = Order(len(conversations), seed)
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        self.position = (0, 0)  # the block being read (the conversations before it), and its rows already taken

    @property
    def epoch(self) -> float:
        return self.position[0] / len(self.conversations)

    def state_dict(self) -> dict:
        return {"conversations_consumed": self.position[0], "block_rows_taken": self.position[1], "seed": self.seed,
                "num_conversations": len(self.conversations),
                "seq_len": self.capacity - 1}

    def load_state_dict(self, state: dict) -> None:
        # each saved fact, and the ChatConfig field that decides it
        for key, value, field in (("seed", self.seed, "seed"),
                                  ("num_conversations", len(self.conversations), "max_conversations"),
                                  ("seq_len", self.capacity - 1, "max_seq_len")):
            if state[key] != value:
                raise ConfigError(field, f"the checkpoint being resumed was trained with {key} {state[key]}, this run "
                                         f"has {value}: the conversations would not continue where they stopped",
                                  "ChatConfig")
        # (saved before packing went a block at a time: the next block starts there)
        self.position = (state["conversations_consumed"], state.get("block_rows_taken", 0))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, self.position = pack(self.conversations.lengths, self.order, self.position, self.capacity,
                                   self.batch_size * self.world_size)
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        inputs, targets = rows_tensor(self.conversations, mine, self.capacity)
        return inputs.to(self.device), targets.to(self.device)

    def close(self) -> None:
        """Nothing runs in the background: batches are small next to a training step."""


def epoch_rows(conversations: RenderedConversations, seq_len: int, seed: int | None = None) -> list[list[int]]:
    """One pass over every conversation, packed into rows: in epoch 0's order of the training stream (seed), or
    in the given order (seed None; the validation rows, the same at every evaluation)."""
    order = Order(len(conversations), seed or 0, shuffle=seed is not None)
    return pack(conversations.lengths, order, (0, 0), seq_len + 1, len(conversations), end=len(conversations))[0]


def steps_per_epoch(conversations: RenderedConversations, seq_len: int, seed: int, rows_per_step: int) -> int:
    """Optimizer steps that one epoch of the conversations takes, rows_per_step rows a step."""
    return max(1, math.ceil(len(epoch_rows(conversations, seq_len, seed)) / rows_per_step))
