"""How full SFT's rows are: packing.pack (best fit, a block of conversations at a time) next to filling rows in
stream order (each row takes conversations until the next does not fit), on the same stream of lengths.

The lengths are drawn log-normally around a few medians (SmolTalk's conversations are long-tailed; the real mixture
is not needed to compare the two ways). Fill = the tokens of conversations / the tokens of the rows; 1 / fill is
how many more steps an epoch takes than rows with no padding would.

    python bench/sft_packing.py [--conversations 20000] [--row 513] [--medians 150,250,350]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat_flyte.data.dataloader import Order  # noqa: E402
from nanochat_flyte.data.packing import pack  # noqa: E402

SPREAD = 0.8  # the log-normal's sigma: most conversations within ~5x of the median, a long tail of long ones


def stream_order_rows(lengths: np.ndarray, order: Order, capacity: int) -> int:
    """Rows of one epoch filled in stream order: the next conversation that does not fit starts a new row."""
    rows, used = 1, 0
    for position in range(len(lengths)):
        size = min(lengths[order[position]], capacity)
        if used and used + size > capacity:
            rows, used = rows + 1, 0
        used += size
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--row", type=int, default=513, help="tokens a row holds: max_seq_len + 1")
    parser.add_argument("--medians", default="150,250,350", help="median conversation lengths, in tokens")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    for median in map(int, args.medians.split(",")):
        lengths = np.clip(rng.lognormal(np.log(median), SPREAD, args.conversations).astype(np.int64), 8, None)
        order = Order(len(lengths), seed=0)
        tokens = int(np.minimum(lengths, args.row).sum())
        best_fit = len(pack(lengths, order, (0, 0), args.row, len(lengths), end=len(lengths))[0])
        stream = stream_order_rows(lengths, order, args.row)
        result = {"median": median, "best_fit_rows": best_fit, "best_fit_fill": tokens / (best_fit * args.row),
                  "stream_order_rows": stream, "stream_order_fill": tokens / (stream * args.row)}
        print(f"median {median} tokens: best fit {best_fit:,} rows (fill {result['best_fit_fill']:.3f}), "
              f"stream order {stream:,} rows (fill {result['stream_order_fill']:.3f}): "
              f"{stream / best_fit:.3f}x the rows", flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
