"""Build a small corpus of real English prose in the FineWeb-Edu shard format, from documentation Debian ships.

    apt-get install -y perl-doc postgresql-doc-15      # the prose: Perl's manual pages, PostgreSQL's manual
    python scripts/build_doc_corpus.py --out /tmp/doc_corpus
    pyflyte run workflows/nanochat.py main --config configs/smoke.yaml   # with data_url=/tmp/doc_corpus:
    nanochat config configs/smoke.yaml data_url=/tmp/doc_corpus -o run.json \
        && pyflyte run workflows/nanochat.py main --config run.json

Generated text shows that code runs; only real text shows whether a recipe learns. Each manual page becomes
documents of whole paragraphs (about FineWeb-Edu's median document length), written as shard_00000.parquet,
shard_00001.parquet, ... and a held-out validation shard_01822.parquet (every VAL_EVERY-th page, so validation
text is never trained on). Code blocks (indented lines) are dropped: the corpus is prose. The shards are written by
the test suite's writer, so they have FineWeb-Edu's exact layout (one `text` column, zstd, row groups of 1024).
The corpus stays out of git: run this script to make it.
"""

import argparse
import html.parser
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.shard_server import write_fineweb_shard  # noqa: E402

PERL_POD = Path("/usr/share/perl/5.36.0/pod")  # perl-doc
POSTGRES_HTML = Path("/usr/share/doc/postgresql-doc-15/html")  # postgresql-doc-15
DOCUMENT_CHARS = 3000  # about FineWeb-Edu's median document
VAL_EVERY = 10  # one page in ten is held out for validation
VAL_SHARD = 1822  # FineWeb-Edu's last shard, which the pipeline validates on


class HTMLText(html.parser.HTMLParser):
    """The paragraphs of an HTML page: the text of <p> elements, without navigation, tables or code."""

    def __init__(self):
        super().__init__()
        self.paragraphs, self.current, self.depth = [], None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self.current = []
        elif tag in ("pre", "table"):
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self.current is not None:
            self.paragraphs.append(" ".join("".join(self.current).split()))
            self.current = None
        elif tag in ("pre", "table"):
            self.depth -= 1

    def handle_data(self, data):
        if self.current is not None and self.depth == 0:
            self.current.append(data)


def pod_paragraphs(path: Path) -> list[str]:
    """A Perl manual page's prose paragraphs (pod2text output; indented code blocks dropped)."""
    text = subprocess.run(["pod2text", "--utf8", "--width", "10000", str(path)], capture_output=True).stdout.decode(
        "utf-8", errors="replace")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith("        ") for line in lines):  # code: indented beyond the text
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def html_paragraphs(path: Path) -> list[str]:
    parser = HTMLText()
    parser.feed(path.read_text(errors="replace"))
    return parser.paragraphs


def documents(paragraphs: list[str]) -> list[str]:
    """Whole paragraphs grouped into documents of about DOCUMENT_CHARS characters."""
    docs, current = [], []
    for paragraph in paragraphs:
        if len(paragraph.split()) < 6:  # headings, labels
            continue
        current.append(paragraph)
        if sum(map(len, current)) >= DOCUMENT_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the shards are written")
    parser.add_argument("--shard-chars", type=int, default=5_000_000, help="characters per train shard")
    args = parser.parse_args()
    pages = [(path, pod_paragraphs) for path in sorted(PERL_POD.glob("*.pod"))]
    pages += [(path, html_paragraphs) for path in sorted(POSTGRES_HTML.glob("*.html"))]
    if not pages:
        raise SystemExit(f"no documentation found in {PERL_POD} or {POSTGRES_HTML}: "
                         "apt-get install -y perl-doc postgresql-doc-15")
    train, val = [], []
    for number, (path, read) in enumerate(pages):
        (val if number % VAL_EVERY == 0 else train).extend(documents(read(path)))
    shards, current = [], []
    for document in train:
        current.append(document)
        if sum(map(len, current)) >= args.shard_chars:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, docs in enumerate(shards):
        write_fineweb_shard(args.out / f"shard_{index:05d}.parquet", docs)
    write_fineweb_shard(args.out / f"shard_{VAL_SHARD:05d}.parquet", val)
    chars = sum(map(len, train))
    print(f"{len(pages)} pages -> {len(train):,} train documents ({chars / 1e6:.1f} M characters) in "
          f"{len(shards)} shards, {len(val):,} validation documents in shard {VAL_SHARD}: {args.out}")


if __name__ == "__main__":
    main()
