"""Static checks of the Dockerfile, of the equivalent ImageSpec and of the Flyte 2 front's image (no Docker engine
here).

What a task needs from its image: Python 3.11 with the package and its dependencies, a CUDA base matching the
torch wheel, git, a C compiler for torch.compile, GPT-2's ranks already cached, and the layout flytekit's fast
registration expects (code unpacked into WORKDIR /root, imported through PYTHONPATH=/root).
"""

import asyncio
import contextlib
import importlib
import io
import re
import shlex
import tempfile
import tomllib
from pathlib import Path

import pytest
from flytekit.image_spec.default_builder import create_docker_context

import workflows.image
import workflows.presets

ROOT = Path(__file__).resolve().parents[1]


def read_stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The Dockerfile's global ARG defaults, and its stages as lists of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), " ".join(rest.split())
        if instruction == "FROM":
            stages.append([])
        if not stages:
            if instruction == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                args[name] = value
            continue
        stages[-1].append((instruction, rest))
    return args, stages


ARGS, STAGES = read_stages(ROOT / "Dockerfile")
FINAL = STAGES[-1]


def stage_env(stage) -> dict[str, str]:
    env = {}
    for instruction, rest in stage:
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def runs(stage) -> str:
    return "\n".join(rest for instruction, rest in stage if instruction == "RUN")


def test_every_stage_starts_from_the_cuda_image_that_matches_the_torch_wheel():
    assert ARGS["CUDA_IMAGE"].startswith("nvidia/cuda:12.8.")  # torch 2.10's default wheel is CUDA 12.8
    assert ARGS["TORCH_VERSION"] == "2.10.0"
    for stage in STAGES:
        assert stage[0][1].split()[0] == "${CUDA_IMAGE}"
    assert ARGS["CUDA_IMAGE"] == workflows.presets.CUDA_IMAGE
    assert ARGS["TORCH_VERSION"] == workflows.presets.TORCH_VERSION


def test_python_311_and_the_package_with_its_dependencies():
    build = runs(STAGES[0])
    assert "uv venv --python 3.11 /opt/venv" in build
    assert re.search(r'uv pip install "torch==\$\{TORCH_VERSION\}" "\.\$\{EXTRAS\}"$', build, re.MULTILINE)
    # the package alone by default; --build-arg EXTRAS="[flyte2]" adds an extra that pyproject.toml declares
    assert ARGS["EXTRAS"] == '""' and ("ARG", "EXTRAS") in STAGES[0]
    assert "flyte2" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    copied = [rest for instruction, rest in STAGES[0] if instruction == "COPY"]
    assert any("pyproject.toml" in rest for rest in copied) and any("nanochat_flyte" in rest for rest in copied)
    assert "COPY --from=build /opt/venv /opt/venv" in [f"COPY {rest}" for _, rest in FINAL]
    assert stage_env(FINAL)["PATH"].startswith("/opt/venv/bin:")


def test_git_and_a_c_compiler_in_the_final_image_and_no_apt_lists_left():
    apt = runs(FINAL)
    installed = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", apt).group(1).split()
    assert {"git", "gcc", "libc6-dev", "ca-certificates"} <= set(installed)
    assert "build-essential" not in installed
    assert "rm -rf /var/lib/apt/lists/*" in apt


def test_gpt2_tokenizer_is_cached_at_build_time_where_tasks_look():
    build_env = stage_env(STAGES[0])
    cache_dir = build_env["TIKTOKEN_CACHE_DIR"]
    assert 'tiktoken.get_encoding("r50k_base")' in runs(STAGES[0])
    assert f"COPY --from=build {cache_dir} {cache_dir}" in [f"COPY {rest}" for _, rest in FINAL]
    assert stage_env(FINAL)["TIKTOKEN_CACHE_DIR"] == cache_dir == workflows.presets.TIKTOKEN_CACHE_DIR


def test_fast_registration_layout():
    workdirs = [rest for instruction, rest in FINAL if instruction == "WORKDIR"]
    assert workdirs[-1] == "/root"
    assert stage_env(FINAL)["PYTHONPATH"] == "/root"


def test_copied_paths_exist_and_pass_the_dockerignore():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for stage in STAGES:
        for instruction, rest in stage:
            if instruction != "COPY" or rest.startswith("--from"):
                continue
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert source in allowed, f"COPY {source}: excluded from the build context by .dockerignore"


def test_image_spec_dependencies_are_pyprojects():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert workflows.presets.PROJECT_DEPENDENCIES == pyproject["project"]["dependencies"], (
        "copy pyproject.toml's dependencies into workflows/presets.py PROJECT_DEPENDENCIES")
    assert pyproject["project"]["requires-python"] == ">=3.11"


def test_image_spec_builds_the_same_image(tmp_path):
    create_docker_context(workflows.image.IMAGE_SPEC, tmp_path)  # what flytekit's builder would build
    dockerfile = (tmp_path / "Dockerfile").read_text()
    requirements = (tmp_path / "requirements_uv.txt").read_text().split()
    assert f"FROM {workflows.presets.CUDA_IMAGE}" in dockerfile
    assert "python=3.11" in dockerfile
    assert re.search(r"apt-get install -y --no-install-recommends\s+git gcc libc6-dev", dockerfile)
    assert "PYTHONPATH=/root" in dockerfile and "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in dockerfile
    assert 'tiktoken.get_encoding("r50k_base")' in dockerfile
    assert "WORKDIR /root" in dockerfile
    assert "torch==2.10.0" in requirements and "flytekitplugins-kfpytorch>=1.16,<1.17" in requirements
    # the presets beside the fast-registered code, which holds Python modules only (workflows/presets.py reads them)
    assert "COPY --chown=flytekit configs /root/configs/" in dockerfile
    assert (tmp_path / "configs" / "d8_t4.yaml").read_bytes() == (ROOT / "configs" / "d8_t4.yaml").read_bytes()


@pytest.fixture
def reload_image(monkeypatch):
    """Re-read workflows.image under the test's environment, and restore it afterwards."""
    yield lambda: importlib.reload(workflows.image)
    monkeypatch.undo()
    importlib.reload(workflows.image)


def test_image_is_built_from_the_spec_unless_a_prebuilt_one_is_named(monkeypatch, reload_image):
    monkeypatch.delenv("NANOCHAT_IMAGE", raising=False)
    monkeypatch.setenv("NANOCHAT_IMAGE_REGISTRY", "ghcr.io/Team")
    image = reload_image()
    assert image.IMAGE is image.IMAGE_SPEC
    assert image.IMAGE_SPEC.image_name().startswith("ghcr.io/team/nanochat-flyte:")

    monkeypatch.setenv("NANOCHAT_IMAGE", "ghcr.io/team/nanochat-flyte:0.1.0")
    assert reload_image().IMAGE == "ghcr.io/team/nanochat-flyte:0.1.0"


def flyte2_dockerfile(tmp_path) -> str:
    """The Dockerfile flyte's local builder would build for the Flyte 2 front's image (a dry run: no Docker)."""
    from flyte._internal.imagebuild.docker_builder import DockerImageBuilder

    from workflows.flyte2.environments import image

    async def docker_command(cls) -> list[str]:  # what it would run: no Docker asked
        return ["docker", "buildx", "build"]

    async def render() -> str:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            await DockerImageBuilder()._build_image(image(), push=False, dry_run=True)
        return output.getvalue()

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("NANOCHAT_FLYTE2_IMAGE", raising=False)
        patch.setattr(DockerImageBuilder, "_build_command_prefix", classmethod(docker_command))
        patch.setattr(tempfile, "tempdir", str(tmp_path))  # the build context it assembles
        return asyncio.run(render())


def test_flyte2_image_is_the_same_image(tmp_path):
    from workflows.flyte2.environments import FLYTE2_DEPENDENCIES, PACKAGE_DIR

    dockerfile = flyte2_dockerfile(tmp_path)
    assert f"FROM {workflows.presets.CUDA_IMAGE}" in dockerfile
    assert "--python=3.11" in dockerfile
    assert re.search(r"apt-get install -y --no-install-recommends\s+git gcc libc6-dev ca-certificates", dockerfile)
    (pip,) = [line for line in dockerfile.splitlines() if "uv pip install" in line and "torch==" in line]
    installed = [shlex.split(argument)[0] for argument in pip.split("$UV_PYTHON", 1)[1].split()]
    assert installed == [f"torch=={workflows.presets.TORCH_VERSION}", *workflows.presets.PROJECT_DEPENDENCIES,
                         *FLYTE2_DEPENDENCIES]
    assert f"uv pip install --python $UV_PYTHON --no-deps {PACKAGE_DIR}" in dockerfile  # the package itself
    assert f"TIKTOKEN_CACHE_DIR={workflows.presets.TIKTOKEN_CACHE_DIR}" in dockerfile
    assert 'tiktoken.get_encoding("r50k_base")' in dockerfile


def test_flyte2_extra_is_what_the_flyte2_image_installs():
    from workflows.flyte2.environments import FLYTE2_DEPENDENCIES

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert FLYTE2_DEPENDENCIES == pyproject["project"]["optional-dependencies"]["flyte2"]
    assert "nanochat-flyte[flyte2]" in pyproject["project"]["optional-dependencies"]["test"]
