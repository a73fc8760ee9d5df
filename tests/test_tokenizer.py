"""GPT-2 and trained-BPE tokenizers: ids, special tokens, self-contained save/load, byte lengths."""

import hashlib
import json
import socket

import numpy as np
import pytest
import tiktoken

from nanochat_flyte.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    EOT,
    GPT2_RANKS_SHA256,
    TokenizerError,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
    tokenizer_id,
    train_bpe,
)
from tests.shard_server import fineweb_texts

UNICODE_TEXT = "Zürich, 東京 and São Paulo — 3.14159 ≈ π; emoji 🦜 and <|endoftext|> as plain text.\n\n  Done."


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(fineweb_texts(500), vocab_size=512)


def test_gpt2_is_r50k_base_with_the_special_tokens_after_it(tmp_path):
    enc = gpt2_tokenizer()
    assert (enc.n_vocab, enc.eot_token) == (50265, 50256)
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids
    assert [enc.encode_single_token(token) for token in CHAT_SPECIAL_TOKENS] == list(range(50257, 50265))
    assert enc.encode_ordinary("<|user_start|>") == tiktoken.get_encoding("r50k_base").encode_ordinary("<|user_start|>")

    save_tokenizer(enc, tmp_path / "tok")
    info = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert (info["name"], info["vocab_size"], info["eot_id"]) == ("gpt2", 50265, 50256)
    assert info["special_tokens"] == {EOT: 50256, **{t: 50257 + i for i, t in enumerate(CHAT_SPECIAL_TOKENS)}}
    # the directory carries GPT-2's ranks file itself, byte for byte r50k_base.tiktoken
    ranks = (tmp_path / "tok" / "tokenizer.tiktoken").read_bytes()
    assert hashlib.sha256(ranks).hexdigest() == info["ranks_sha256"] == GPT2_RANKS_SHA256
    assert load_tokenizer(tmp_path / "tok").encode_ordinary(UNICODE_TEXT) == enc.encode_ordinary(UNICODE_TEXT)


def test_loading_a_tokenizer_directory_never_touches_the_network(tmp_path, monkeypatch):
    save_tokenizer(gpt2_tokenizer(), tmp_path / "tok")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # tiktoken would have to download

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    enc = load_tokenizer(tmp_path / "tok")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    # building GPT-2's tokenizer does need the ranks: one line says how to get them offline
    tiktoken.registry.ENCODINGS.pop("r50k_base", None)  # tiktoken's in-process cache
    with pytest.raises(TokenizerError, match=r"scripts/cache_gpt2_tokenizer\.py"):
        gpt2_tokenizer()


def test_a_tampered_or_incomplete_directory_is_refused(tmp_path):
    save_tokenizer(gpt2_tokenizer(), tmp_path / "tok")
    ranks_file = tmp_path / "tok" / "tokenizer.tiktoken"
    ranks_file.write_bytes(ranks_file.read_bytes()[:-100])
    with pytest.raises(TokenizerError, match="does not match the ranks_sha256"):
        load_tokenizer(tmp_path / "tok")
    ranks_file.unlink()
    with pytest.raises(TokenizerError, match="has no tokenizer.tiktoken"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(TokenizerError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "nowhere")


def test_bpe_vocab_ends_with_the_special_tokens_and_round_trips(bpe, tmp_path):
    assert bpe.n_vocab == 512 and bpe.eot_token == 503 and bpe.decode([503]) == EOT
    assert bpe.encode_single_token("<|output_end|>") == 511
    for text in [UNICODE_TEXT, *fineweb_texts(20, seed=99)]:
        tokens = bpe.encode_ordinary(text)
        assert max(tokens) < 503 and bpe.decode(tokens) == text

    loaded = load_tokenizer(save_tokenizer(bpe, tmp_path / "tok"))
    assert (loaded.n_vocab, loaded.eot_token) == (512, 503)
    assert loaded.encode_ordinary(UNICODE_TEXT) == bpe.encode_ordinary(UNICODE_TEXT)
    assert loaded.encode("<|assistant_end|>", allowed_special="all") == [507]  # 503 EOT, 504..511 chat


def test_bpe_learns_frequent_words(bpe):
    # " the" is the most frequent word of the generated text: one merged token, not four bytes.
    assert len(bpe.encode_ordinary(" the")) == 1
    assert len(bpe.encode_ordinary(UNICODE_TEXT)) < len(UNICODE_TEXT.encode())


def test_bpe_digits_merge_in_groups_of_at_most_two():
    enc = train_bpe(["in 2024, 123456 and 789 units"] * 100, vocab_size=300)
    digit_tokens = [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)]
    digit_tokens = [token for token in digit_tokens if token.isdigit()]
    assert max(map(len, digit_tokens)) == 2
    assert [enc.decode([t]) for t in enc.encode_ordinary("123456")] == ["12", "34", "56"]


def test_retrained_tokenizer_in_the_same_directory_loads_fresh(tmp_path):
    texts = fineweb_texts(100)
    save_tokenizer(train_bpe(texts, 300), tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").n_vocab == 300
    save_tokenizer(train_bpe(texts, 400), tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").n_vocab == 400


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_token_byte_lengths(bpe, name):
    enc = gpt2_tokenizer() if name == "gpt2" else bpe
    lengths = token_byte_lengths(enc)
    assert lengths.shape == (enc.n_vocab,) and lengths[enc.eot_token] == 0
    assert lengths[enc.encode_single_token("<|assistant_end|>")] == 0
    assert lengths[:256].min() >= 1
    tokens = enc.encode_ordinary(UNICODE_TEXT) + [enc.eot_token]
    assert lengths[np.array(tokens)].sum() == len(UNICODE_TEXT.encode("utf-8"))


def test_tokenizer_id_changes_with_the_ranks(bpe, tmp_path):
    assert tokenizer_id(gpt2_tokenizer()) == "gpt2"
    other = train_bpe(fineweb_texts(500), vocab_size=400)
    assert tokenizer_id(bpe).startswith("bpe-") and tokenizer_id(bpe) != tokenizer_id(other)
    assert tokenizer_id(load_tokenizer(save_tokenizer(bpe, tmp_path / "tok"))) == tokenizer_id(bpe)
