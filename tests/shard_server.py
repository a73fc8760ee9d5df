"""FineWeb-Edu look-alike shards and a local HTTP server that serves them, with faults on demand.

Tests and the benchmark use this instead of the internet:
- `fineweb_texts(n, seed)`: deterministic English-like documents (with some unicode), FineWeb-Edu-sized.
- `write_fineweb_shard(path, texts)`: parquet in the dataset's exact format: one `text` string column,
  zstd, row groups of 1024 documents.
- `serve_shards(directory)`: a ThreadingHTTPServer on 127.0.0.1 (a free port) with Range requests (from a byte,
  or the last N bytes; with If-Range against each file's ETag, a hash of its bytes), Content-Length, HEAD, and
  per-path faults: 503, 429 + Retry-After, connection reset mid-body, truncated body, 302 redirect, 404, 416. It
  records every request (method, path, headers) for assertions.
- `shard_server`: a pytest fixture around `serve_shards(tmp_path / "shards")`.
"""

import contextlib
import hashlib
import http.server
import itertools
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# ----------------------------------------------------------------------------- documents

WORDS = """the of and to in a is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more can out up into
do time only other new some could these two may first then than its also after most over year years people
water energy students learning school teachers history science study research health children world system
language cells plants species climate data different important example number many through between during
because each those under while where must often such both however early small large form found include used
using called known light heat earth body blood brain disease treatment patients design process theory model
reading writing mathematics education program community development environment population government
economic social cultural ancient modern century region river mountain ocean forest animals evolution
chemical reaction molecules atoms electrons temperature pressure surface volume measure results evidence
""".split()
# Words a BPE tokenizer must handle as multi-byte UTF-8: accents, CJK, Greek, symbols.
UNICODE_WORDS = ("café naïve résumé Zürich São Paulo Ångström façade 東京 日本語 中文 Ελληνικά "
                 "π ≈ ° € — “quoted” …").split()
PUNCTUATION = [". ", ". ", ". ", "? ", "! ", "; ", ", "]


def _sentence(rng: random.Random, cum_weights: list[float]) -> str:
    words = rng.choices(WORDS, cum_weights=cum_weights, k=rng.randint(6, 24))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(UNICODE_WORDS))
    if rng.random() < 0.2:  # numbers: years, percentages, measurements
        number = rng.choice([str(rng.randint(1500, 2024)), f"{rng.random() * 100:.1f}%", f"{rng.randint(1, 999)} km"])
        words.insert(rng.randrange(len(words)), number)
    return " ".join(words).capitalize() + rng.choice(PUNCTUATION)


def fineweb_texts(num_docs: int, seed: int = 0) -> list[str]:
    """Deterministic documents of a few sentences to a few paragraphs (FineWeb-Edu's median is ~2-3k chars)."""
    rng = random.Random(seed)
    # Zipf-like word frequencies (weight 1/rank), so BPE finds the frequent words first, as in real text.
    cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, len(WORDS) + 1)))
    texts = []
    for _ in range(num_docs):
        paragraphs = ["".join(_sentence(rng, cum_weights) for _ in range(rng.randint(2, 8))).strip()
                      for _ in range(rng.randint(1, 10))]
        texts.append("\n\n".join(paragraphs))
    return texts


def write_fineweb_shard(path: Path, texts: list[str], row_group_size: int = 1024) -> Path:
    """Write `texts` as a FineWeb-Edu shard: one `text` string column, zstd, `row_group_size` docs per group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")
    return path


def write_fineweb_shards(directory: Path, indices: list[int], docs_per_shard: int, seed: int = 0) -> list[Path]:
    """shard_{index:05d}.parquet for each index, each with its own deterministic documents."""
    return [write_fineweb_shard(directory / f"shard_{index:05d}.parquet", fineweb_texts(docs_per_shard, seed + index))
            for index in indices]


# ----------------------------------------------------------------------------- the server

FAULTS = ("503", "429", "reset", "truncate", "redirect", "404", "401", "403", "416")


@dataclass
class Fault:
    kind: str  # one of FAULTS
    times: int | None  # requests it answers; None = every request (a permanent fault)
    retry_after: int = 1  # seconds, for "429"
    location: str = ""  # target path, for "redirect"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class ShardServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.faults: dict[str, list[Fault]] = {}
        self.requests: list[Request] = []
        self.supports_range = True
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), ShardRequestHandler)  # port 0: any free port

    @classmethod
    def on_port(cls, directory: Path, port: int, parser) -> "ShardServer":
        """For a script's --port: a port in use or out of range is the argparse parser's one line."""
        try:
            return cls(directory, port=port)
        except OSError as error:
            parser.error(f"--port: cannot listen on 127.0.0.1 port {port}: {error.strerror}")
        except OverflowError:
            parser.error(f"--port: must be 0..65535, got {port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # not a client that hung up, as clients may
            super().handle_error(request, client_address)

    def fail(self, path: str, kind: str, times: int | None = 1, **options) -> None:
        """Answer the next `times` requests for `path` (e.g. "/shard_00000.parquet") with fault `kind`."""
        assert kind in FAULTS, kind
        with self.lock:
            self.faults.setdefault(path, []).append(Fault(kind, times, **options))

    def content(self, path: str) -> bytes | None:
        """The body for `path`: the file under `directory` (None: 404). Subclasses add routes (tests/hub_server.py)."""
        file = self.directory / path.lstrip("/")
        return file.read_bytes() if file.is_file() else None

    @contextlib.contextmanager
    def running(self) -> Iterator["ShardServer"]:
        """Serve from a background thread for the duration of the block, then close."""
        # Poll for shutdown every 10 ms instead of 500 ms: tests start and stop many servers.
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()
            thread.join()

    def serve_until_interrupted(self, what: str) -> None:
        """Serve in the foreground until Ctrl-C (scripts/serve_test_*.py)."""
        print(f"serving {what} at {self.url} (Ctrl-C to stop)", flush=True)
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def next_fault(self, path: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(path, [])
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    queue.pop(0)
            return fault


class ShardRequestHandler(http.server.BaseHTTPRequestHandler):
    server: ShardServer
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would

    def log_message(self, format, *args):  # quiet: pytest shows failures, not every request
        pass

    def do_HEAD(self):
        self.respond(send_body=False)

    def do_GET(self):
        self.respond(send_body=True)

    def respond(self, send_body: bool) -> None:
        server = self.server
        with server.lock:
            server.requests.append(Request(self.command, self.path, dict(self.headers)))
        fault = server.next_fault(self.path)
        if fault and fault.kind in ("503", "429", "404", "401", "403", "416", "redirect"):
            self.send_response(302 if fault.kind == "redirect" else int(fault.kind))
            if fault.kind == "429":
                self.send_header("Retry-After", str(fault.retry_after))
            if fault.kind == "redirect":
                self.send_header("Location", fault.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        data = server.content(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        # bytes=N- (from byte N) or bytes=-N (the last N bytes, or the whole of a shorter file)
        range_match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if range_match and (bool(range_match.group(1)) == bool(range_match.group(2))):
            range_match = None  # a range with both ends (or neither): not one our clients ask for
        # If-Range: the range only if the file is still the one the client's bytes came from, else the whole file
        if_range_holds = self.headers.get("If-Range", etag) == etag
        if range_match and server.supports_range and if_range_holds:
            first, last = range_match.groups()
            start = int(first) if first else max(0, len(data) - int(last))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if server.supports_range:
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not send_body:
            return
        if fault and fault.kind in ("reset", "truncate"):
            self.wfile.write(body[: len(body) // 2])
            if fault.kind == "reset":
                time.sleep(0.1)  # let the client read what was sent: a reset discards unread data
                # SO_LINGER 0: close() sends a TCP RST instead of a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve_shards(directory: Path) -> Iterator[ShardServer]:
    """Serve `directory` on 127.0.0.1 at a free port for the duration of the block."""
    with ShardServer(directory).running() as server:
        yield server


@pytest.fixture
def shard_server(tmp_path) -> Iterator[ShardServer]:
    """A ShardServer over tmp_path / "shards" (empty: tests write the shards they need)."""
    directory = tmp_path / "shards"
    directory.mkdir()
    with serve_shards(directory) as server:
        yield server
