"""CORE's eval bundle: fetched (a zip or a directory, local or at any URL), unpacked once into a cache, and checked
whole before any model is loaded, so that a bad file is one line naming it, not a failure an hour in.

The bundle holds `core.yaml` (the tasks), `eval_data/` (one JSONL file per dataset) and `eval_meta_data.csv`
(each task's random baseline, in percent).
"""

import csv
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import yaml

from nanochat_flyte.config import EVAL_BUNDLE_URL
from nanochat_flyte.data.download import (
    CorruptFile,
    DownloadError,
    default_cache_dir,
    download_file,
    is_http,
    probe,
    source_key,
)
from nanochat_flyte.errors import ConfigError, UserError
from nanochat_flyte.files import local_path

CORE_YAML = "core.yaml"

DATA_DIR = "eval_data"

META_CSV = "eval_meta_data.csv"
TASK_COLUMN, BASELINE_COLUMN = "Eval Task", "Random baseline"

DEFAULT_DELIMITER = " "
UNPACKED_FROM = ".unpacked_from"  # in an unpacked zip's folder: the size and time of the zip it came from

FIELDS = {  # the fields each task type's examples need, and their JSON types
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}

OPTIONS_FIELD = {"multiple_choice": "choices", "schema": "context_options"}  # the list `gold` indexes


class BundleError(UserError, ValueError):
    """The eval bundle is not usable; the message names the file (and line or field) at fault."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # a key of FIELDS
    num_fewshot: int
    delimiter: str  # between context and continuation
    random_baseline: float  # percent
    examples: tuple[dict, ...]


@dataclass(frozen=True)
class Bundle:
    """A parsed, validated bundle: every example in memory, usable for any number of evaluations."""
    source: str
    tasks: tuple[CoreTask, ...]


def cache_name(source: str) -> str:
    """eval_bundle-<hash of the URL>: two sources with the same file name never share a cache entry."""
    stem = PurePosixPath(source.rstrip("/")).name.removesuffix(".zip") or "bundle"
    return f"{stem}-{source_key(source)}"


def verify_zip(path: Path) -> None:
    """A readable zip: its central directory (at the very end of the file) lists the members. What is in it is
    checked after the download, as a BundleError: downloading again cannot fix a zip without core.yaml."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptFile(f"{path.name} is not a readable zip file: {e}") from e


def publish_directory(fill, target: Path) -> Path:
    """Fill a temporary folder beside target, then rename it into place: target exists only when complete."""
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        fill(temp)
    except BaseException:  # a failed fetch or unpack leaves nothing in the cache
        shutil.rmtree(temp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.rename(temp, target)
    return target


def unpack(zip_path: Path, target: Path) -> Path:
    """The zip unpacked at target, once: reused while the zip is the one unpacked there (its size and modification
    time, recorded beside what it holds), unpacked anew when it changed (downloaded again, or a local zip
    rewritten)."""
    stat = zip_path.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    if (target / UNPACKED_FROM).is_file() and (target / UNPACKED_FROM).read_text() == stamp:
        return target

    def extract(temp: Path) -> None:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(temp)  # zipfile drops absolute paths and ".." from member names
        except (zipfile.BadZipFile, OSError) as e:
            raise BundleError(f"{zip_path}: cannot be unpacked: {e}") from e
        (temp / UNPACKED_FROM).write_text(stamp)

    return publish_directory(extract, target)


def fetch_bundle(source: str, cache_dir: Path | None = None) -> Path:
    """A local directory holding the bundle: the source itself (a local directory), or unpacked into the cache from
    a zip (local, http(s) or any fsspec URL, downloaded with retries) or from a remote directory (fsspec)."""
    cache_dir = Path(cache_dir or default_cache_dir("eval_bundle"))
    what = "the CORE eval bundle"
    if (path := local_path(source)) is not None:
        if path.is_dir():
            return path
    elif not is_http(source):
        try:
            filesystem, path = fsspec.core.url_to_fs(source)
            is_directory = filesystem.isdir(path)
        except (ImportError, OSError, ValueError) as e:  # ImportError: s3fs or gcsfs is not installed
            raise DownloadError(what, source, str(e)) from e
        if is_directory:
            target = cache_dir / cache_name(source)
            if target.is_dir():
                return target
            return publish_directory(lambda temp: filesystem.get(path.rstrip("/") + "/", str(temp), recursive=True),
                                     target)
    download = download_file(source, cache_dir / f"{cache_name(source)}.zip", verify_zip, what)
    return unpack(download.path, cache_dir / cache_name(source))


def bundle_root(directory: Path) -> Path:
    """The folder holding core.yaml: the directory itself, or its one subfolder that does (eval_bundle/ in the
    official zip)."""
    if (directory / CORE_YAML).is_file():
        return directory
    nested = [child for child in sorted(directory.iterdir()) if (child / CORE_YAML).is_file()]
    if len(nested) != 1:
        found = f"in each of {', '.join(child.name for child in nested)}" if nested else "there or one folder down"
        raise BundleError(f"no single {CORE_YAML} in the bundle ({found})")
    return nested[0]


def load_bundle(source: str | Path = EVAL_BUNDLE_URL, cache_dir: Path | None = None) -> Bundle:
    """Fetch (see fetch_bundle), parse and validate a bundle. Every problem raises one BundleError naming the
    bundle, the file and the field or line, before any model runs."""
    try:
        return read_bundle(str(source), cache_dir)
    except BundleError as error:
        raise BundleError(f"eval bundle {source}: {error}") from None


def read_bundle(source: str, cache_dir: Path | None) -> Bundle:
    top = fetch_bundle(source, cache_dir)
    root = bundle_root(top)

    def name(path: Path) -> str:  # paths in messages: relative to the top of the bundle
        return path.relative_to(top).as_posix()

    tasks_file = root / CORE_YAML
    try:
        config = yaml.safe_load(tasks_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleError(f"{name(tasks_file)}: not valid YAML: {' '.join(str(e).split())}") from e
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{name(tasks_file)}: needs a non-empty list 'icl_tasks'")
    baselines = read_baselines(root / META_CSV, name)
    datasets: dict[str, tuple[dict, ...]] = {}  # hellaswag and hellaswag_zeroshot share one file
    tasks = []
    for position, entry in enumerate(entries):
        label = entry.get("label") if isinstance(entry, dict) else None
        where = f"{name(tasks_file)}: icl_tasks[{position}]" + (f" ({label})" if isinstance(label, str) else "")
        if not isinstance(label, str) or not label:
            raise BundleError(f"{where}: needs a 'label' (a non-empty string)")
        if any(task.label == label for task in tasks):
            raise BundleError(f"{where}: label '{label}' appears twice")
        task_type = entry.get("icl_task_type")
        if task_type not in FIELDS:
            raise BundleError(f"{where}: unknown icl_task_type {task_type!r}; expected one of {', '.join(FIELDS)}")
        num_fewshot = entry.get("num_fewshot")
        if isinstance(num_fewshot, list) and len(num_fewshot) == 1:  # the official core.yaml writes [10]
            num_fewshot = num_fewshot[0]
        if not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool) or num_fewshot < 0:
            raise BundleError(f"{where}: num_fewshot must be an integer >= 0 (or a list of one), got "
                              f"{entry.get('num_fewshot')!r}")
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        if not isinstance(delimiter, str):
            raise BundleError(f"{where}: continuation_delimiter must be a string, got {delimiter!r}")
        uri = entry.get("dataset_uri")
        if not isinstance(uri, str) or not uri:
            raise BundleError(f"{where}: needs a 'dataset_uri' (a path under {DATA_DIR}/)")
        data_file = root / DATA_DIR / uri
        if not data_file.resolve().is_relative_to((root / DATA_DIR).resolve()):  # an absolute uri or one with ..
            raise BundleError(f"{where}: dataset_uri '{uri}' must be a path under {DATA_DIR}/")
        if not data_file.is_file():
            raise BundleError(f"{where}: dataset_uri '{uri}': no such file {name(data_file)}")
        if label not in baselines:
            raise BundleError(f"{name(root / META_CSV)}: no '{BASELINE_COLUMN}' row for task '{label}' "
                              f"(column '{TASK_COLUMN}')")
        baseline = parse_baseline(label, *baselines[label], name(root / META_CSV))
        key = f"{task_type} {uri}"
        if key not in datasets:
            datasets[key] = read_examples(data_file, name(data_file), task_type)
        examples = datasets[key]
        if len(examples) <= num_fewshot:
            raise BundleError(f"{where}: num_fewshot {num_fewshot} needs at least {num_fewshot + 1} examples; "
                              f"{name(data_file)} has {len(examples)}")
        if not delimiter:
            check_continuations(examples, task_type, name(data_file))
        tasks.append(CoreTask(label, task_type, num_fewshot, delimiter, baseline, examples))
    return Bundle(source, tuple(tasks))


def read_baselines(path: Path, name) -> dict[str, tuple[int, str]]:
    """Task label -> (line, random baseline as written) from eval_meta_data.csv; other columns are ignored, and only
    the rows of the tasks in core.yaml are checked (the file lists more tasks than CORE uses)."""
    if not path.is_file():
        raise BundleError(f"{name(path)}: missing (it holds every task's '{BASELINE_COLUMN}')")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:  # e.g. saved by a spreadsheet as cp1252
        line = data[:e.start].count(b"\n") + 1
        raise BundleError(f"{name(path)}: not UTF-8 text ({e.reason} at line {line})") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in (TASK_COLUMN, BASELINE_COLUMN) if column not in (reader.fieldnames or [])]
    if missing:
        raise BundleError(f"{name(path)}: no column '{missing[0]}' (columns: {reader.fieldnames})")
    return {row[TASK_COLUMN]: (reader.line_num, row[BASELINE_COLUMN]) for row in reader}


def parse_baseline(label: str, line: int, value: str, where: str) -> float:
    try:
        baseline = float(value)
    except (TypeError, ValueError):
        baseline = float("nan")
    if not 0 <= baseline < 100:  # 100 would divide by zero when centering
        raise BundleError(f"{where} line {line}: '{BASELINE_COLUMN}' of '{label}' must be a number in [0, 100), "
                          f"got {value!r}")
    return baseline


def read_examples(path: Path, name: str, task_type: str) -> tuple[dict, ...]:
    """Every example of a JSONL file, each checked for the fields its task type needs."""
    examples = []
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{name} line {line_number}"
            try:
                example = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise BundleError(f"{where}: not UTF-8 text ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise BundleError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(example, dict):
                raise BundleError(f"{where}: not a JSON object")
            check_example(example, task_type, where)
            examples.append(example)
    if not examples:
        raise BundleError(f"{name}: no examples")
    return tuple(examples)


def check_example(example: dict, task_type: str, where: str) -> None:
    for field, kind in FIELDS[task_type].items():
        if field not in example:
            raise BundleError(f"{where}: missing field '{field}'")
        value = example[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{where}: field '{field}' must be a {kind.__name__} ({type(value).__name__} found)")
    options_field = OPTIONS_FIELD.get(task_type)
    if options_field:
        options = example[options_field]
        if not options or not all(isinstance(option, str) for option in options):
            raise BundleError(f"{where}: field '{options_field}' must be a non-empty list of strings")
        if not 0 <= example["gold"] < len(options):
            raise BundleError(f"{where}: field 'gold' is {example['gold']}, not an index into the "
                              f"{len(options)} '{options_field}'")


def check_continuations(examples: tuple[dict, ...], task_type: str, name: str) -> None:
    """Without a delimiter, an empty continuation would leave no token to score."""
    for number, example in enumerate(examples, start=1):
        continuations = example["choices"] if task_type == "multiple_choice" else [example["continuation"]]
        if "" in continuations:
            raise BundleError(f"{name} example {number}: an empty continuation and no continuation_delimiter: "
                              "nothing to score")


def check_bundle_url(url: str) -> None:
    """Fail fast, before any download or GPU time, unless url points at something that can be a bundle: an
    existing local zip or directory (with core.yaml), or a URL that answers. Raises one ConfigError."""
    if not url:
        raise ConfigError("eval_bundle_url", "must not be empty")
    if (path := local_path(url)) is not None:
        if path.is_dir():
            try:
                bundle_root(path)
            except BundleError as e:
                raise ConfigError("eval_bundle_url", f"{url!r}: {e}") from e
        elif not path.is_file():
            raise ConfigError("eval_bundle_url", f"{url!r}: not found")
        elif not zipfile.is_zipfile(path):
            raise ConfigError("eval_bundle_url", f"{url!r} is not a zip file (eval_bundle.zip) or a bundle directory")
        return
    answer = probe(url)
    if answer is not None:
        raise ConfigError("eval_bundle_url", f"{url!r} is unreachable: {answer}")
