"""The `nanochat` command: every stage is a subcommand with its own help, and the package's imports go one way."""

import ast
import os
import subprocess
from pathlib import Path

import pytest
from helpers import NANOCHAT

from nanochat_flyte.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "nanochat_flyte"
CONFIG_MODULES = {"errors", "schema", "config", "files", "hostile_text"}  # the top-level modules, for every sub-package
# What each sub-package's docstring says it may import (beside itself), and the top-level modules' own order.
ALLOWED = {
    "errors": set(), "schema": {"errors"}, "config": {"errors", "schema"}, "files": {"errors"}, "hostile_text": set(),
    "data": CONFIG_MODULES,
    "model": CONFIG_MODULES | {"data"},
    "reporting": CONFIG_MODULES | {"data"},
    "inference": CONFIG_MODULES | {"data", "model"},
    "evaluation": CONFIG_MODULES | {"data", "model", "reporting", "inference"},
    "training": CONFIG_MODULES | {"data", "model", "reporting", "inference", "evaluation"},
    "pipeline": CONFIG_MODULES | {"data", "model", "reporting", "inference", "evaluation", "training"},
    "cli": CONFIG_MODULES | {"data", "model", "reporting", "inference", "evaluation", "training", "pipeline"},
}


def nanochat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NANOCHAT, *args], capture_output=True, text=True, timeout=120)


def test_nanochat_help_lists_every_stage_in_pipeline_order():
    result = nanochat("--help")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["config", "prepare", "train", "core-eval", "sft", "rl", "chat-eval", "sample", "chat", "serve"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_a_help_with_an_example(command):
    result = nanochat(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: nanochat {command} ")
    assert f"\n  nanochat {command} " in result.stdout  # an example, as the user would type it


def test_an_unknown_command_is_one_line_with_a_suggestion():
    result = nanochat("trian")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: unknown command 'trian'; did you mean train? (see nanochat --help)\n"
    assert nanochat().returncode == 2  # no command: the usage, and the status of a usage error


@pytest.mark.parametrize("argv", [["train", "--config", "configs/smoke.yaml", "--data-dir", "d", "--out-dir", "o",
                                   "--resume-dir", "s3://bucket/run"],
                                  ["sft", "--base-checkpoint", "b", "--out-dir", "gs://bucket/chat"],
                                  ["prepare", "--config", "configs/smoke.yaml", "--out-dir", "s3://bucket/data"]])
def test_a_uri_where_a_command_writes_or_reads_a_local_folder_is_one_line(argv):
    """Path would make a relative folder of it ("s3:/bucket/run") and the command would go on there."""
    result = nanochat(*argv)
    flag = argv[argv.index(next(arg for arg in argv if "://" in arg)) - 1]
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"error: argument {flag}: a local directory, got the URI ")


@pytest.mark.parametrize("argv, line", [
    (["prepare", "--config", "configs/smoke.yaml", "--out-dir", ""],
     "error: argument --out-dir: empty: give a folder (see nanochat prepare --help)"),  # it meant the current folder
    (["sft", "--base-checkpoint", "b", "--out-dir", "/"],
     "error: argument --out-dir: the root folder: give a folder of its own (see nanochat sft --help)"),
    (["prepare", "--config", "", "--out-dir", "d"],  # `--config "$PRESET"` unset: it meant the reference run
     "error: RunConfig.*: empty: give a preset file (YAML or JSON)"),
    (["config", "configs/smoke.yaml", "depth=4", "-o", "configs/smoke.yaml"],
     "error: RunConfig.*: -o 'configs/smoke.yaml' is the preset it reads: write to a file of its own"),
])
def test_an_empty_or_self_defeating_path_is_one_line(argv, line):
    before = Path("configs/smoke.yaml").read_text()
    result = nanochat(*argv)
    assert (result.returncode, result.stderr.strip()) == (2, line)
    assert Path("configs/smoke.yaml").read_text() == before


def test_config_o_leaves_a_checkpoints_record_alone(tmp_path):
    (tmp_path / "training_state.json").write_text("{}")
    result = nanochat("config", "configs/smoke.yaml", "-o", str(tmp_path / "config.json"))
    assert result.returncode == 2 and "is in a checkpoint's folder (training_state.json)" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_python_m_runs_the_same_command():
    result = subprocess.run([str(Path(NANOCHAT).with_name("python3")), "-m", "nanochat_flyte", "config", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: nanochat config ")


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("argv", [["config", "configs/smoke.yaml"], ["--help"]], ids=["config", "help"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(argv, unbuffered):
    """`nanochat ... | head`: no BrokenPipeError traceback, and the status a shell gives a command its reader left,
    whether stdout is written at once or at the end (PYTHONUNBUFFERED)."""
    command = subprocess.Popen([NANOCHAT, *argv], cwd=PACKAGE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    command.stdout.close()  # before the command writes
    assert command.stderr.read() == "" and command.wait(timeout=120) == 141


def imports_of(path: Path, prefix: str = "nanochat_flyte.") -> set[str]:
    """The modules starting with `prefix` that `path` imports, in any form: `from nanochat_flyte.x import y`,
    `from nanochat_flyte import x`, `import nanochat_flyte.x`, relative imports (`from .. import x`),
    importlib.import_module("..."), at module level or inside a function."""
    package = ".".join(("nanochat_flyte", *path.relative_to(PACKAGE).parent.parts))
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (package.rsplit(".", node.level - 1)[0] if node.level > 1 else package) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            modules.add(module)
            modules.update(f"{module}.{alias.name}" for alias in node.names)  # (a name, or a module it holds)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            modules.add(str(node.args[0].value))
    return {module for module in modules if module.startswith(prefix)}


def test_each_sub_package_imports_only_what_its_docstring_allows():
    assert set(ALLOWED) == {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
                            if (path.suffix == ".py" or (path / "__init__.py").exists())
                            and path.stem not in ("__init__", "__main__")}
    forbidden = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("__init__", "__main__"):
            continue
        for module in imports_of(path):
            imported = module.split(".")[1]
            if imported != parts[0] and imported not in ALLOWED[parts[0]]:
                forbidden.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert forbidden == []


def test_the_library_imports_no_flyte_front():
    """nanochat_flyte is plain Python + torch: usable without Flyte, and both fronts call it, never the reverse."""
    assert [f"{path.relative_to(PACKAGE)} imports {module}" for path in PACKAGE.rglob("*.py")
            for prefix in ("flytekit", "flyte", "workflows") for module in imports_of(path, prefix)
            if module.split(".")[0] in ("flytekit", "flyte", "flyteidl", "flyteidl2", "workflows")] == []


def test_no_module_imports_itself_back_through_others():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("nanochat_flyte", *path.relative_to(PACKAGE).with_suffix("").parts))
        graph[name.removesuffix(".__init__")] = {module for module in imports_of(path)}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for module in graph.get(start, ()):
            if module == target or (module not in seen and not seen.add(module) and reaches(module, target, seen)):
                return True
        return False

    assert [name for name in graph if reaches(name, name, set())] == []
