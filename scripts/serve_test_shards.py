"""Serve generated FineWeb-Edu-format shards on 127.0.0.1, for trying the workflow without the internet.

    python scripts/serve_test_shards.py --shards 0 1822 --docs 2000 --port 8765
    pyflyte run workflows/nanochat.py main \
        --config "$(nanochat config configs/smoke.yaml data_url=http://127.0.0.1:8765)"

The shards are written by the same code the tests use (tests/shard_server.py): one `text` column, zstd,
row groups of 1024 documents. The text is synthetic, so the samples read like word salad.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.shard_server import ShardServer, write_fineweb_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1822], help="shard indices to serve")
    parser.add_argument("--docs", type=int, default=2000, help="documents per shard")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = ShardServer.on_port(Path(directory), args.port, parser)  # first: a busy port before the shards
        write_fineweb_shards(Path(directory), args.shards, args.docs)
        server.serve_until_interrupted(f"shards {args.shards}")


if __name__ == "__main__":
    main()
