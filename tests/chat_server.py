"""Fixtures for the chat front ends (CLI, server, page): a tiny trained checkpoint, base and "chat", and real
servers (`nanochat serve` in a subprocess on a free port of 127.0.0.1)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from helpers import make_data_dir, tiny_config

from nanochat_flyte.training.pretrain import train

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # long enough for multi-turn prompts and for answers that take a while to decode


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """A depth-1 model trained for 6 steps on the generated documents: a base checkpoint."""
    data_dir = make_data_dir(tmp_path_factory.mktemp("chat-data"), n_train_tokens=20_000, n_val_tokens=1_000)
    out = tmp_path_factory.mktemp("chat-models") / "base"
    train(tiny_config(max_seq_len=CONTEXT, device_batch_size=1, total_batch_size=CONTEXT, num_iterations=6,
                      eval_tokens=2 * CONTEXT), data_dir, out)
    return out


@pytest.fixture(scope="session")
def chat_checkpoint(base_checkpoint) -> Path:
    """The same weights marked as a chat checkpoint. The weights are a base model's (SFT makes real ones): the
    tests that use it check the plumbing of chat mode (rendering, streaming, the API), not the answers' quality."""
    out = base_checkpoint.parent / "chat"
    shutil.copytree(base_checkpoint, out)
    state_file = out / "training_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "phase": "chat"}))
    return out


# uvicorn's line once it listens: with --port 0 it names the port the system chose
LISTENING = re.compile(r"Uvicorn running on http://(\S+):(\d+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()


def start_server(checkpoint: Path, log: Path, *args: str, env: dict | None = None) -> Server:
    """`nanochat serve` on a port the system chooses (--port 0): no other process can take it between a choice here
    and the server's bind."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "nanochat_flyte", "serve", "--checkpoint", str(checkpoint),
                                    "--port", "0", "--device", "cpu", *args], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if listening := LISTENING.search(log.read_text()):
            host = "127.0.0.1" if listening[1] == "0.0.0.0" else listening[1]  # (all addresses: loopback's too)
            server = Server(f"http://{host}:{listening[2]}", process, log)
            try:
                server.health()
                return server
            except requests.ConnectionError:
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not answer /health within 120 s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def chat_server(chat_checkpoint, tmp_path_factory):
    """The chat checkpoint served with room for 8 concurrent answers."""
    server = start_server(chat_checkpoint, tmp_path_factory.mktemp("logs") / "chat_server.log",
                          "--max-concurrent", "8")
    yield server
    stop_server(server)


API_KEY = "test-key-7f3a"


@pytest.fixture(scope="session")
def base_server(base_checkpoint, tmp_path_factory):
    """The base checkpoint (plain completion mode), one answer at a time, behind an API key."""
    server = start_server(base_checkpoint, tmp_path_factory.mktemp("logs") / "base_server.log",
                          "--max-concurrent", "1", env={"NANOCHAT_API_KEY": API_KEY})
    yield server
    stop_server(server)
