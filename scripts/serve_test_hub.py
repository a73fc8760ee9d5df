"""Serve generated chat datasets behind the hub's parquet listing API on 127.0.0.1, for offline runs of the chat stage.

    python scripts/serve_test_hub.py --port 8766
    HF_ENDPOINT=http://127.0.0.1:8766 python -c "from pathlib import Path; from nanochat_flyte.config import \
ChatConfig; from nanochat_flyte.data.chat_data import prepare_sft_data; prepare_sft_data(ChatConfig(), Path('sft'))"

or give a ChatConfig `hf_endpoint=http://127.0.0.1:8766`. The datasets are the ones the tests use
(tests/hub_server.py: every split the chat stage reads, a few dozen rows each, in the hub's exact schemas).
Downloads are cached (NANOCHAT_FLYTE_CACHE/hub): clear that folder to download again.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hub_server import HubServer, write_hub_datasets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = HubServer.on_port(Path(directory), args.port, parser)  # first: a busy port before the datasets
        rows = write_hub_datasets(Path(directory))
        for (repo, subset, split), count in rows.items():
            print(f"{server.url}/api/datasets/{repo}/parquet/{subset}/{split}: {count} rows")
        server.serve_until_interrupted("the hub")


if __name__ == "__main__":
    main()
