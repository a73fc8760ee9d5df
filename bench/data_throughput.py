"""Data-stage throughput on generated FineWeb-Edu-like shards, in one run:

- tokenization: the stage (prepare.tokenize_shard: parquet row groups -> uint16 .bin, all cores) next to plain
  `enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())` over the same text held in memory;
  target ratio >= 0.9. Best of --repeats runs each, interleaved, so a busy machine slows both alike.
- download: download.download_shards from a local HTTP server into an empty cache, in MB/s.

    python bench/data_throughput.py [--mb 64] [--repeats 3]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.shard_server, when run as a script

from nanochat_flyte.data.download import download_shards  # noqa: E402
from nanochat_flyte.data.prepare import tokenize_shard  # noqa: E402
from nanochat_flyte.data.tokenizer import GPT2_ENCODING  # noqa: E402
from tests.shard_server import fineweb_texts, serve_shards, write_fineweb_shard  # noqa: E402

DOCS_PER_SHARD = 8192  # ~20 MB of text per shard file: several shards, so the downloads run in parallel


def generate_shards(directory: Path, megabytes: float) -> list[list[str]]:
    """Write shard_00000.parquet, ... until `megabytes` of UTF-8 text; return each shard's documents."""
    shards, total_bytes = [], 0
    while total_bytes < megabytes * 1e6:
        texts = fineweb_texts(DOCS_PER_SHARD, seed=len(shards))
        write_fineweb_shard(directory / f"shard_{len(shards):05d}.parquet", texts)
        shards.append(texts)
        total_bytes += sum(len(text.encode()) for text in texts)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=64, help="megabytes of text to generate")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    enc = tiktoken.get_encoding(GPT2_ENCODING)
    threads = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.time()
        shards = generate_shards(tmp / "shards", args.mb)
        texts = [text for shard in shards for text in shard]
        text_mb = sum(len(text.encode()) for text in texts) / 1e6
        print(f"generated {len(shards)} shards, {len(texts):,} documents, {text_mb:.1f} MB of text "
              f"in {time.time() - start:.0f}s; {threads} CPUs")

        with serve_shards(tmp / "shards") as server:
            start = time.time()
            downloads = list(download_shards(server.url, list(range(len(shards))), tmp / "cache", workers=8))
            seconds = time.time() - start
        file_mb = sum(d.bytes for d in downloads) / 1e6
        print(f"download: {file_mb:.1f} MB of parquet in {seconds:.2f}s = {file_mb / seconds:.1f} MB/s "
              f"(local server, 8 workers)")

        paths = sorted(tmp.glob("shards/*.parquet"))
        stage_seconds, plain_seconds, tokens = [], [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = sum(tokenize_shard(path, enc, tmp / f"{path.stem}.bin")["tokens"] for path in paths)
            stage_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            enc.encode_ordinary_batch(texts, num_threads=threads)
            plain_seconds.append(time.perf_counter() - start)

    for name, seconds in (("stage (tokenize_shard)", min(stage_seconds)),
                          ("plain encode_ordinary_batch", min(plain_seconds))):
        print(f"{name:30s} {text_mb / seconds:7.2f} MB/s  {tokens / seconds / 1e6:6.2f} M tokens/s  "
              f"(best of {args.repeats}: {seconds:.2f}s)")
    print(f"ratio stage / plain: {min(plain_seconds) / min(stage_seconds):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
