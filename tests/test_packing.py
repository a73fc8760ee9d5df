"""Conversations packed into rows: hand-checked rows and targets, a resumable stream, DDP slices."""

import numpy as np
import pytest
import torch
from helpers import load_bench

from nanochat_flyte.data.dataloader import Order
from nanochat_flyte.data.packing import (
    BLOCK,
    ConversationLoader,
    RenderedConversations,
    block_rows,
    epoch_rows,
    rows_tensor,
    steps_per_epoch,
)
from nanochat_flyte.data.tokenizer import gpt2_tokenizer
from nanochat_flyte.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_a_row_holds_whole_conversations_and_trains_only_on_the_assistant(gpt2):
    # "Hi" -> "Hello": <eot> <user_start> Hi <user_end> <assistant_start> Hello <assistant_end> = 7 tokens
    conversations = RenderedConversations(gpt2, [chat("Hi", "Hello"), chat("Hi", "Hello"), chat("Hi", "Hello")], 16)
    assert list(conversations.lengths) == [7, 7, 7]
    rows = epoch_rows(conversations, seq_len=15, seed=None)
    assert rows == [[0, 1], [2]]  # 7 + 7 fit in 16 tokens; a third would not: it starts the next row
    inputs, targets = rows_tensor(conversations, rows, capacity=16)
    hi, hello = gpt2.encode_ordinary("Hi")[0], gpt2.encode_ordinary("Hello")[0]
    bos, user_start, user_end, assistant_start, assistant_end = 50256, 50257, 50258, 50259, 50260
    one = [bos, user_start, hi, user_end, assistant_start, hello, assistant_end]
    assert inputs[0].tolist() == (one + one + [bos])[:15]
    # targets: the next token where the assistant wrote it, else -1 (user turn, BOS, padding)
    assert targets[0].tolist() == [-1, -1, -1, -1, hello, assistant_end, -1, -1, -1, -1, -1, hello, assistant_end,
                                   -1, -1]
    assert targets[1].tolist() == [-1, -1, -1, -1, hello, assistant_end] + [-1] * 9


def test_rows_are_filled_best_fit_a_block_at_a_time():
    """The longest conversation first, each into the row it fills best: 4 rows where filling in stream order (the
    next one that does not fit ending a row: [9] [9, 7] [7] [20] [3]) takes 5."""
    lengths = np.array([9, 9, 7, 7, 20, 3])
    rows, after = block_rows(lengths, Order(len(lengths), 0, shuffle=False), 0, capacity=16)
    assert rows == [[4], [0, 2], [1, 3], [5]] and after == 6  # 20 is cut to a row of its own
    many = np.arange(BLOCK * 3) % 13 + 1
    order = Order(len(many), seed=1)
    first, after = block_rows(many, order, 0, capacity=16)
    assert after == BLOCK and sorted(i for row in first for i in row) == sorted(order[p] for p in range(BLOCK))
    assert all(sum(many[i] for i in row) <= 16 for row in first)
    # a block never spans two epochs, so an epoch's rows are those steps_per_epoch counted
    assert block_rows(many, order, 2 * BLOCK + 50, capacity=16)[1] == 3 * BLOCK


def test_a_long_conversation_is_cut_to_a_row_and_one_with_nothing_to_learn_is_dropped(gpt2):
    long_answer = chat("Hi", "word " * 100)
    long_question = chat("word " * 100, "ok")  # its answer lies past the row: nothing to train on
    conversations = RenderedConversations(gpt2, [long_answer, long_question, chat("Hi", "Hello")], 33)
    assert len(conversations) == 2 and conversations.dropped == 1
    assert conversations.lengths[0] == 33


def test_the_stream_resumes_exactly_and_ranks_take_their_slices(gpt2):
    texts = [chat(f"Question {i}?", "Answer " * (i % 7 + 1)) for i in range(40)]
    conversations = RenderedConversations(gpt2, texts, 64)
    straight = ConversationLoader(conversations, 4, 63, seed=3, device=CPU)
    batches = [next(straight) for _ in range(6)]  # more than an epoch: the second epoch has a new order
    assert straight.epoch > 1

    resumed = ConversationLoader(conversations, 4, 63, seed=3, device=CPU)
    for _ in range(2):
        next(resumed)
    state = resumed.state_dict()
    again = ConversationLoader(conversations, 4, 63, seed=3, device=CPU)
    again.load_state_dict(state)
    for expected in batches[2:]:
        assert all(torch.equal(a, b) for a, b in zip(next(again), expected))

    ranks = [ConversationLoader(conversations, 2, 63, seed=3, device=CPU, rank=r, world_size=2) for r in range(2)]
    for expected in batches[:3]:  # 2 ranks x 2 rows = the single process's 4 rows
        halves = [next(rank) for rank in ranks]
        assert torch.equal(torch.cat([h[0] for h in halves]), expected[0])
        assert torch.equal(torch.cat([h[1] for h in halves]), expected[1])

    with pytest.raises(ConfigError, match=r"ChatConfig\.seed: the checkpoint being resumed was trained with seed 3, "
                                          "this run has 4"):
        ConversationLoader(conversations, 4, 63, seed=4, device=CPU).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"ChatConfig\.max_conversations: .* num_conversations \d+, this run has 5"):
        ConversationLoader(RenderedConversations(gpt2, texts[:5], 64), 4, 63, seed=3,
                           device=CPU).load_state_dict(state)


def test_one_epoch_of_steps(gpt2):
    conversations = RenderedConversations(gpt2, [chat("Hi", "Hello")] * 10, 16)  # 2 per row: 5 rows an epoch
    assert len(epoch_rows(conversations, 15, seed=1)) == 5
    assert steps_per_epoch(conversations, 15, seed=1, rows_per_step=2) == 3
    assert np.all(conversations.masks.sum() == 10 * 2)


def test_the_packing_bench_finds_best_fit_rows_fuller_than_stream_order():
    (result,) = load_bench("sft_packing").main(["--conversations", "2000", "--medians", "200"])
    assert result["best_fit_fill"] > 0.9 > result["stream_order_fill"]
    assert result["best_fit_rows"] < result["stream_order_rows"]
