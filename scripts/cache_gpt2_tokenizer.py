"""Fill tiktoken's cache with the GPT-2 ranks from PyPI, for machines that reach only package registries.

tiktoken's `r50k_base` is GPT-2's vocabulary, split pattern and <|endoftext|> in one file,
`r50k_base.tiktoken`. The openai-whisper source distribution on PyPI ships a byte-identical copy at
`whisper/assets/gpt2.tiktoken`; we take that file (without installing whisper), check its sha256 and store
it where tiktoken looks: <cache>/<sha1 of the blob URL>, the cache being $TIKTOKEN_CACHE_DIR, else
$DATA_GYM_CACHE_DIR, else <temp dir>/data-gym-cache (tiktoken's own rule).
Users with internet never need this: tiktoken downloads the file itself.

    python scripts/cache_gpt2_tokenizer.py [CACHE_DIR]
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"


def cache_gpt2_tokenizer(cache_dir: Path) -> Path:
    target = cache_dir / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == R50K_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        WHISPER_SDIST, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != R50K_SHA256:
        raise RuntimeError(f"{WHISPER_SDIST} gpt2.tiktoken does not match r50k_base's sha256 {R50K_SHA256}")
    target.write_bytes(data)
    return target


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for cached files (tiktoken.load.read_file_cached)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", nargs="?", type=Path, default=tiktoken_cache_dir(),
                        help="default: where tiktoken looks (%(default)s)")
    print(cache_gpt2_tokenizer(parser.parse_args().cache_dir))
