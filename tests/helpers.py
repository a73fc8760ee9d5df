"""Small shared test helpers: a valid data directory of real GPT-2 tokens, tiny training configs, the benchmarks'
randomly initialised model."""

import hashlib
import importlib.util
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import tiktoken
import torch

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.tokenizer import gpt2_tokenizer, load_tokenizer, save_tokenizer
from nanochat_flyte.model.gpt import GPT, GPTConfig

SUBJECTS = ["The cat", "A teacher", "The river", "My neighbour", "The old machine", "Every student", "The city"]
VERBS = ["sees", "builds", "remembers", "carries", "explains", "paints", "follows"]
OBJECTS = ["a small boat", "the bright moon", "three red apples", "the long road", "a quiet song", "the map"]
ENDINGS = [".", " today.", " in the morning.", " near the sea.", " with great care."]

# the `nanochat` command that `pip install` put beside this interpreter ([project.scripts])
NANOCHAT = str(Path(sys.executable).with_name("nanochat"))


def generated_documents(seed: int):
    """Endless simple English documents: varied, but regular enough that a tiny model learns them quickly."""
    rng = random.Random(seed)
    while True:
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
                     for _ in range(rng.randint(2, 6))]
        yield " ".join(sentences)


def tokens_of_documents(num_tokens: int, seed: int) -> np.ndarray:
    """num_tokens GPT-2 tokens: each document is <|endoftext|> followed by its tokens, as the data stage writes."""
    encoding = tiktoken.get_encoding("r50k_base")
    tokens: list[int] = []
    for document in generated_documents(seed):
        tokens.append(encoding.eot_token)
        tokens.extend(encoding.encode_ordinary(document))
        if len(tokens) >= num_tokens:
            return np.array(tokens[:num_tokens], dtype=np.uint16)


def make_data_dir(path: Path, n_train_tokens: int = 20_000, n_val_tokens: int = 4_000, *, n_train_shards: int = 2,
                  seed: int = 0) -> Path:
    """A data directory laid out as docs/architecture.md describes, with the GPT-2 tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "train").mkdir()
    (path / "val").mkdir()
    enc = load_tokenizer(save_tokenizer(gpt2_tokenizer(), path / "tokenizer"))
    tokenizer = {"name": "gpt2", "vocab_size": enc.n_vocab, "eot_id": enc.eot_token}

    def write_shard(split: str, shard: int, tokens: np.ndarray) -> dict:
        file = f"{split}/shard_{shard:05d}.bin"
        data = tokens.astype("<u2").tobytes()
        (path / file).write_bytes(data)
        return {"shard": shard, "file": file, "tokens": len(tokens), "documents": int((tokens == 50256).sum()),
                "characters": 0, "utf8_bytes": 0, "sha256": hashlib.sha256(data).hexdigest(), "source": "generated"}

    train_tokens = tokens_of_documents(n_train_tokens, seed)
    train = [write_shard("train", shard, part)
             for shard, part in enumerate(np.array_split(train_tokens, n_train_shards))]
    val = [write_shard("val", 1822, tokens_of_documents(n_val_tokens, seed + 1))]
    manifest = {"tokenizer": tokenizer, "train": train, "val": val, "train_tokens": n_train_tokens,
                "val_tokens": n_val_tokens, "tokens_needed": 0, "epochs": 0.0}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def tiny_config(**overrides) -> RunConfig:
    """A depth-1 model on 32-token sequences: a few optimizer steps take well under a second on a CPU."""
    values = dict(run_name="test", depth=1, max_seq_len=32, device_batch_size=4, total_batch_size=256,
                  num_iterations=6, eval_every=3, eval_tokens=512, sample_every=3, sample_max_tokens=4,
                  save_every=3, device="cpu", dtype="float32", compile=False, wandb_mode="disabled",
                  warmdown_ratio=0.5)
    values.update(overrides)
    return RunConfig(**values)


def load_bench(name: str):
    """A benchmark script of bench/ as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_gpt(depth: int, seq_len: int, device: torch.device) -> tuple[GPT, tiktoken.Encoding]:
    """A freshly initialised GPT-2-vocabulary model whose predictions vary (init_weights zeroes the head, which would
    make every token tie), and its tokenizer: what the benchmarks time when no checkpoint is given."""
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, tokenizer.n_vocab, seq_len)).to(device)
    model.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    return model, tokenizer


def interrupted_after_a_save(command: list[str], cwd: Path, env: dict, save_line: str) -> tuple[int, list[str]]:
    """A workflow run stopped with Ctrl-C (SIGINT) as soon as it prints save_line: its exit status and output
    lines. The run is killed if a wait fails, so that none is left behind."""
    run = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line.startswith(save_line):
                run.send_signal(signal.SIGINT)
                break
        lines += run.stdout.readlines()
        return run.wait(timeout=120), lines
    finally:
        run.kill()
