"""Write a small generated CORE bundle in the exact eval_bundle.zip format, for trying CORE without the internet.

    python scripts/write_test_core_bundle.py /tmp/core_bundle.zip
    nanochat core-eval --checkpoint runs/smoke --bundle /tmp/core_bundle.zip --max-per-task 20

The bundle is written by the same code the tests use (tests/core_bundle.py): all three task types, few-shot and
zero-shot, a custom continuation delimiter. Its text is synthetic, so its scores say only that CORE runs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.core_bundle import write_core_bundle, zip_directory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip_path", type=Path, help="where the zip goes, e.g. /tmp/core_bundle.zip")
    parser.add_argument("--examples-per-task", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_core_bundle(Path(directory), args.examples_per_task, args.seed)
        print(zip_directory(Path(directory), args.zip_path))


if __name__ == "__main__":
    main()
