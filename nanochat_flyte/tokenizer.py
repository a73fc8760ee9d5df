"""Tokenizers: GPT-2's, or our own byte-level BPE trained nanochat-style. Both are tiktoken.Encodings.

A tokenizer directory holds tokenizer.json ({name, vocab_size, eot_id, pattern}) and, for "bpe", the
trained ranks in tiktoken's own file format (tokenizer.tiktoken). Loading needs no network for "bpe"; for
"gpt2" tiktoken reads r50k_base from its cache (it downloads the file once where the cache is empty).
"""

import base64
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

EOT = "<|endoftext|>"
# r50k_base has exactly GPT-2's ranks, split pattern and <|endoftext|> (id 50256), in one file; the "gpt2"
# encoding would fetch the same ranks from two legacy files (encoder.json + vocab.bpe).
GPT2_ENCODING = "r50k_base"
# GPT-4's split pattern, except that digits split in groups of 1-2 instead of 1-3: small vocabularies
# cannot afford 1000 three-digit tokens (nanochat's choice).
BPE_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                     r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"


def gpt2_tokenizer() -> tiktoken.Encoding:
    return tiktoken.get_encoding(GPT2_ENCODING)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Learn a byte-level BPE of `vocab_size` tokens in all: 256 bytes, merges, and <|endoftext|> last."""
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=BPE_SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    # Too little text can stop the merges early; <|endoftext|> then takes the first free id.
    return tiktoken.Encoding(name="bpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def tokenizer_name(enc: tiktoken.Encoding) -> str:
    return "gpt2" if enc.name == GPT2_ENCODING else "bpe"


def tokenizer_id(enc: tiktoken.Encoding) -> str:
    """A name that changes whenever the token ids would: "gpt2", or "bpe-" + a hash of the pattern and ranks.
    Cached token files are keyed by it, so shards tokenized by another trained BPE are never reused."""
    if tokenizer_name(enc) == "gpt2":
        return "gpt2"
    digest = hashlib.sha256(enc._pat_str.encode())  # _pat_str: tiktoken keeps the split pattern only here
    ranks = mergeable_ranks(enc)
    for token in sorted(ranks, key=ranks.get):
        digest.update(token + b"\0")
    return f"bpe-{digest.hexdigest()[:16]}"


def mergeable_ranks(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """Token bytes -> id for every ordinary token, read back through tiktoken's public API."""
    special_ids = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special_ids}


# The .tiktoken format: one "base64(token bytes) rank" line per token. We read and write it ourselves because
# tiktoken.load caches files by path in TIKTOKEN_CACHE_DIR: a tokenizer retrained into the same directory
# would load the stale ranks (and dump_tiktoken_bpe needs the blobfile package).
def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank))


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def save_tokenizer(enc: tiktoken.Encoding, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = tokenizer_name(enc)
    # _pat_str: tiktoken keeps the split pattern only in this attribute.
    info = {"name": name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "pattern": enc._pat_str}
    if name == "bpe":
        write_ranks(mergeable_ranks(enc), directory / RANKS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return directory


def load_tokenizer(directory: Path) -> tiktoken.Encoding:
    directory = Path(directory)
    info = json.loads((directory / CONFIG_FILE).read_text())
    if info["name"] == "gpt2":
        enc = gpt2_tokenizer()
    else:
        ranks = read_ranks(directory / RANKS_FILE)
        enc = tiktoken.Encoding(name="bpe", pat_str=info["pattern"], mergeable_ranks=ranks,
                                special_tokens={EOT: len(ranks)})
    if (enc.n_vocab, enc.eot_token) != (info["vocab_size"], info["eot_id"]):
        raise ValueError(f"{directory / CONFIG_FILE} says vocab_size={info['vocab_size']}, eot_id={info['eot_id']} "
                         f"but the loaded tokenizer has {enc.n_vocab}, {enc.eot_token}")
    return enc


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens): the denominator of bits per byte."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for token, rank in mergeable_ranks(enc).items():
        lengths[rank] = len(token)
    return lengths
