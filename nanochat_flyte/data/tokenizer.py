"""Tokenizers: GPT-2's, or our own byte-level BPE trained nanochat-style. Both are tiktoken.Encodings.

Every tokenizer has the same special tokens: `<|endoftext|>`, which starts every document (it doubles as BOS),
and the chat tokens nanochat renders conversations with (`<|user_start|>` ... `<|output_end|>`). They come after
the ordinary tokens: for GPT-2 at ids 50256 and 50257..50264, inside the model's embedding padded to 50304 rows,
so base and chat checkpoints have the same shapes. Pretraining text never contains them (it is encoded with
encode_ordinary), so base training is unchanged by their presence.

A tokenizer directory is self-contained: tokenizer.json ({name, vocab_size, eot_id, pattern, special_tokens,
ranks_sha256}) and the ranks themselves in tiktoken's file format (tokenizer.tiktoken), checked against the sha256
on load. Loading never touches the network. Only building the "gpt2" directory reads GPT-2's ranks from tiktoken,
which downloads them once into its cache (scripts/cache_gpt2_tokenizer.py fills that cache where the download
host is out of reach).
"""

import base64
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tiktoken

from nanochat_flyte.errors import UserError

EOT = "<|endoftext|>"
# Reserved for conversations (nanochat's scheme): user and assistant turns, and a python tool's call and output.
CHAT_SPECIAL_TOKENS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                       "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
SPECIAL_TOKENS = (EOT, *CHAT_SPECIAL_TOKENS)
# r50k_base has exactly GPT-2's ranks, split pattern and <|endoftext|> (id 50256), in one file; the "gpt2"
# encoding would fetch the same ranks from two legacy files (encoder.json + vocab.bpe).
GPT2_ENCODING = "r50k_base"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base.tiktoken
# GPT-4's split pattern, except that digits split in groups of 1-2 instead of 1-3: small vocabularies
# cannot afford 1000 three-digit tokens (nanochat's choice).
BPE_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                     r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"


class TokenizerError(UserError, ValueError):
    """A tokenizer directory or source that cannot give the tokenizer; the message says what to do."""


def with_special_tokens(name: str, pattern: str, ranks: dict[bytes, int],
                        special_tokens: Iterable[str] = SPECIAL_TOKENS) -> tiktoken.Encoding:
    """An Encoding of the ordinary ranks plus the special tokens, numbered right after them."""
    specials = {token: len(ranks) + i for i, token in enumerate(special_tokens)}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's ranks from tiktoken (its cache, or a download once), with our special tokens."""
    try:
        r50k = tiktoken.get_encoding(GPT2_ENCODING)
    except Exception as error:  # tiktoken raises requests/urllib/blobfile errors, depending on the host
        raise TokenizerError(
            f"GPT-2's ranks ({GPT2_ENCODING}.tiktoken) are not in tiktoken's cache and could not be downloaded "
            f"({type(error).__name__}); where openaipublic.blob.core.windows.net is out of reach, run "
            "the repository's `python scripts/cache_gpt2_tokenizer.py` (fetches them from PyPI into tiktoken's "
            "cache)") from None
    return with_special_tokens("gpt2", r50k._pat_str, r50k._mergeable_ranks)  # tiktoken keeps both only here


def train_bpe(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Learn a byte-level BPE of `vocab_size` tokens in all: 256 bytes, merges, then the special tokens."""
    import rustbpe  # only BPE training needs it (the GPU acceptance machine has none; training there does not)

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=BPE_SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    # Too little text can stop the merges early; the special tokens then take the first free ids.
    return with_special_tokens("bpe", trainer.get_pattern(), ranks)


def tokenizer_id(enc: tiktoken.Encoding) -> str:
    """A name that changes whenever the token ids of text would: "gpt2", or "bpe-" + a hash of the pattern and
    ranks. Cached token files are keyed by it, so shards tokenized by another trained BPE are never reused."""
    if enc.name == "gpt2":
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


def special_token_ids(enc: tiktoken.Encoding) -> dict[str, int]:
    return {token: enc.encode_single_token(token) for token in sorted(enc.special_tokens_set,
                                                                     key=enc.encode_single_token)}


# The .tiktoken format: one "base64(token bytes) rank" line per token, by rank. Written by us, GPT-2's file is
# byte for byte r50k_base.tiktoken (same sha256). We read it ourselves because tiktoken.load caches files by path
# in TIKTOKEN_CACHE_DIR: a tokenizer retrained into the same directory would load the stale ranks.
def ranks_bytes(ranks: dict[bytes, int]) -> bytes:
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank).encode()


def parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.decode().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def save_tokenizer(enc: tiktoken.Encoding, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = ranks_bytes(mergeable_ranks(enc))
    (directory / RANKS_FILE).write_bytes(data)
    info = {"name": enc.name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
            "pattern": enc._pat_str,  # tiktoken keeps the split pattern only in this attribute
            "special_tokens": special_token_ids(enc), "ranks_sha256": hashlib.sha256(data).hexdigest()}
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return directory


def load_tokenizer(directory: Path) -> tiktoken.Encoding:
    """The tokenizer saved in `directory`, from its own files only (never the network)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise TokenizerError(f"{directory} is not a tokenizer directory: no {CONFIG_FILE}")
    info = json.loads((directory / CONFIG_FILE).read_text())
    ranks_path = directory / RANKS_FILE
    if not ranks_path.is_file():
        raise TokenizerError(f"{directory} has no {RANKS_FILE}: it was written by nanochat-flyte 0.1, before "
                             "tokenizer directories carried their ranks; prepare the data again")
    data = ranks_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["ranks_sha256"]:
        raise TokenizerError(f"{ranks_path} does not match the ranks_sha256 in {directory / CONFIG_FILE}: the file "
                             "is corrupt or was replaced")
    ranks = parse_ranks(data)
    if info["name"] == "gpt2" and info["ranks_sha256"] != GPT2_RANKS_SHA256:
        raise TokenizerError(f"{ranks_path} claims to be GPT-2's ranks but is not r50k_base.tiktoken")
    specials = sorted(info["special_tokens"], key=info["special_tokens"].get)
    enc = with_special_tokens(info["name"], info["pattern"], ranks, specials)
    if (enc.n_vocab, enc.eot_token, special_token_ids(enc)) != (info["vocab_size"], info["eot_id"],
                                                                 info["special_tokens"]):
        raise TokenizerError(f"{directory / CONFIG_FILE} says vocab_size={info['vocab_size']}, "
                             f"eot_id={info['eot_id']} but the loaded tokenizer has {enc.n_vocab}, {enc.eot_token}")
    return enc


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens): the denominator of bits per byte."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for token, rank in mergeable_ranks(enc).items():
        lengths[rank] = len(token)
    return lengths
