"""The Dockerfile, read as data (no Docker engine here): its install step is the README's,
its Ray is the chart's, it runs as a non-root user, and no weights go into the image."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _readme_install_commands() -> list[str]:
    """Commands in the README's bash blocks that run scripts/install-runtime.sh."""
    readme = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if "scripts/install-runtime.sh" in command:
                commands.append(command)
    return commands


def test_install_step_is_the_readmes_command(steps: list[tuple[str, str]]) -> None:
    readme = _readme_install_commands()
    # The README's two variants: the default (CPU) and RAYTSEG_TORCH=cuda.
    assert readme == ["scripts/install-runtime.sh", "RAYTSEG_TORCH=cuda scripts/install-runtime.sh"]
    runs = [args for keyword, args in steps if keyword == "RUN" and "install-runtime.sh" in args]
    assert len(runs) == 1
    commands = [c.strip() for c in runs[0].split("&&")]
    assert "scripts/install-runtime.sh" in commands
    # The variant comes from the README's own variable, a build argument defaulting to cpu.
    assert ("ARG", "RAYTSEG_TORCH=cpu") in steps


def test_ci_runs_the_same_install(steps: list[tuple[str, str]]) -> None:
    setup = (REPO / "scripts" / "setup-ci-tools.sh").read_text()
    assert 'PATH="$venv/bin:$PATH" scripts/install-runtime.sh' in setup
    # in a copy of the image's build context: the Dockerfile's COPY sources
    assert """awk '$1 == "COPY" { $1 = ""; $NF = ""; print }' Dockerfile""" in setup
    assert "scripts/setup-ci-tools.sh" in (REPO / "scripts" / "test.sh").read_text()


def test_ray_version_comes_from_the_install_script(steps: list[tuple[str, str]]) -> None:
    """One pin (scripts/install-runtime.sh); the Dockerfile names no Ray version of its own."""
    text = " ".join(args for _, args in steps)
    assert not re.search(r"ray[\[=]|RAY_VERSION", text)
    copied = [args for keyword, args in steps if keyword == "COPY"]
    assert "scripts/install-runtime.sh ./scripts/install-runtime.sh" in copied


def test_runs_as_a_non_root_user(steps: list[tuple[str, str]]) -> None:
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"useradd[^&]*--uid {user}\b", DOCKERFILE.read_text())
    # The chart runs the pods as the same user.
    import yaml

    values = yaml.safe_load((REPO / "helm" / "raytseg" / "values.yaml").read_text())
    assert str(values["podSecurityContext"]["runAsUser"]) == user


def test_no_weights_in_the_image(steps: list[tuple[str, str]]) -> None:
    copied = []
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            assert keyword == "COPY", "ADD can fetch URLs; use COPY"
            *sources, _ = shlex.split(args)
            copied += [s for s in sources if not s.startswith("--")]
    assert copied == ["pyproject.toml", "README.md", "constraints", "scripts/install-runtime.sh", "raytseg"]
    weight_files = re.compile(r"\.(pth|pt|ckpt|zip|safetensors)$|^Dataset\d+_")
    for source in copied:
        for path in [REPO / source, *(REPO / source).rglob("*")]:
            assert not weight_files.search(path.name), path
    text = " ".join(args for _, args in steps)  # the instructions, comments left out
    assert "weights download" not in text
    assert "weights synth" not in text
    assert "RAYTSEG_WEIGHTS" not in text  # chosen at deploy time, never built in


def test_dockerignore_admits_only_the_install_inputs() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert admitted == ["pyproject.toml", "README.md", "constraints", "scripts/install-runtime.sh", "raytseg"]


def test_health_check_and_ports(steps: list[tuple[str, str]]) -> None:
    (health,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in health
    (exposed,) = [args.split() for keyword, args in steps if keyword == "EXPOSE"]
    assert set(exposed) == {"8000", "8080"}
    (cmd,) = [args for keyword, args in steps if keyword == "CMD"]
    assert cmd.startswith('["raytseg", "serve"')


def test_the_base_and_pips_sources_are_build_arguments(steps: list[tuple[str, str]]) -> None:
    """scripts/build-image.sh builds without a registry or an index; users get the defaults."""
    assert ("ARG", "BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm") in steps
    assert [args for keyword, args in steps if keyword == "FROM"] == ["${BASE_IMAGE}"]
    offline = [args for keyword, args in steps if keyword == "ARG" and args.startswith("PIP_")]
    assert offline == ["PIP_NO_INDEX", "PIP_FIND_LINKS"]  # no defaults: unset unless given
    script = (REPO / "scripts" / "build-image.sh").read_text()
    assert "--build-arg PIP_NO_INDEX=1" in script
    assert "--build-arg BASE_IMAGE=" in script
