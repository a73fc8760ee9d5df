"""GPT-2 and trained-BPE tokenizers: ids, save/load, byte lengths."""

import json

import numpy as np
import pytest

from nanochat_flyte.tokenizer import (EOT, gpt2_tokenizer, load_tokenizer, save_tokenizer, token_byte_lengths,
                                      tokenizer_id, train_bpe)
from tests.shard_server import fineweb_texts

UNICODE_TEXT = "Zürich, 東京 and São Paulo — 3.14159 ≈ π; emoji 🦜 and <|endoftext|> as plain text.\n\n  Done."


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(fineweb_texts(500), vocab_size=512)


def test_gpt2_is_r50k_base_with_eot_last(tmp_path):
    enc = gpt2_tokenizer()
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids
    save_tokenizer(enc, tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == {
        "name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "pattern": enc._pat_str}
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]
    assert load_tokenizer(tmp_path / "tok").encode_ordinary(UNICODE_TEXT) == enc.encode_ordinary(UNICODE_TEXT)


def test_bpe_vocab_includes_eot_and_round_trips(bpe, tmp_path):
    assert bpe.n_vocab == 512 and bpe.eot_token == 511 and bpe.decode([511]) == EOT
    for text in [UNICODE_TEXT, *fineweb_texts(20, seed=99)]:
        tokens = bpe.encode_ordinary(text)
        assert max(tokens) < 511 and bpe.decode(tokens) == text

    loaded = load_tokenizer(save_tokenizer(bpe, tmp_path / "tok"))
    assert (loaded.n_vocab, loaded.eot_token) == (512, 511)
    assert loaded.encode_ordinary(UNICODE_TEXT) == bpe.encode_ordinary(UNICODE_TEXT)
    assert loaded.encode(EOT, allowed_special="all") == [511]


def test_bpe_learns_frequent_words(bpe):
    # " the" is the most frequent word of the generated text: one merged token, not four bytes.
    assert len(bpe.encode_ordinary(" the")) == 1
    assert len(bpe.encode_ordinary(UNICODE_TEXT)) < len(UNICODE_TEXT.encode())


def test_bpe_digits_merge_in_groups_of_at_most_two():
    enc = train_bpe(["in 2024, 123456 and 789 units"] * 100, vocab_size=300)
    digit_tokens = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab - 1)]
    digit_tokens = [token for token in digit_tokens if token.isdigit()]
    assert max(map(len, digit_tokens)) == 2
    assert [enc.decode([t]) for t in enc.encode_ordinary("123456")] == ["12", "34", "56"]


def test_retrained_tokenizer_in_the_same_directory_loads_fresh(tmp_path):
    texts = fineweb_texts(100)
    save_tokenizer(train_bpe(texts, 300), tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").n_vocab == 300
    save_tokenizer(train_bpe(texts, 400), tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").n_vocab == 400


def test_load_rejects_a_ranks_file_that_disagrees_with_tokenizer_json(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path / "tok")
    ranks_file = tmp_path / "tok" / "tokenizer.tiktoken"
    ranks_file.write_text("".join(ranks_file.read_text().splitlines(keepends=True)[:-10]))  # a truncated copy
    with pytest.raises(ValueError, match="vocab_size=512, eot_id=511 but the loaded tokenizer has 502, 501"):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_token_byte_lengths(bpe, name):
    enc = gpt2_tokenizer() if name == "gpt2" else bpe
    lengths = token_byte_lengths(enc)
    assert lengths.shape == (enc.n_vocab,) and lengths[enc.eot_token] == 0
    assert lengths[:256].min() >= 1
    tokens = enc.encode_ordinary(UNICODE_TEXT) + [enc.eot_token]
    assert lengths[np.array(tokens)].sum() == len(UNICODE_TEXT.encode("utf-8"))


def test_tokenizer_id_changes_with_the_ranks(bpe, tmp_path):
    assert tokenizer_id(gpt2_tokenizer()) == "gpt2"
    other = train_bpe(fineweb_texts(500), vocab_size=400)
    assert tokenizer_id(bpe).startswith("bpe-") and tokenizer_id(bpe) != tokenizer_id(other)
    assert tokenizer_id(load_tokenizer(save_tokenizer(bpe, tmp_path / "tok"))) == tokenizer_id(bpe)
