"""The one way configs are read: YAML, layers merged key by key, strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytseg.config import check_device
from raytseg.configfile import Strict, env_overrides, merged, read_yaml, validated
from raytseg.errors import InvalidOptionError


class Section(Strict):
    token: str = "x"
    port: int = 1


class Root(Strict):
    name: str = "a"
    section: Section = Section()


def test_layers_merge_nested_sections_key_by_key() -> None:
    base = {"name": "a", "section": {"token": "t", "port": 1}}
    assert merged(base, {"section": {"port": 2}}) == {"name": "a", "section": {"token": "t", "port": 2}}
    assert merged(base, {"section": None}) == {"name": "a", "section": None}


def test_env_variables_become_nested_yaml_values() -> None:
    env = {"APP__SECTION__PORT": "8080", "APP__NAME": "", "OTHER": "1"}
    assert env_overrides(env, "APP__") == {"name": "", "section": {"port": 8080}}


def test_an_empty_file_is_an_empty_mapping(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml", "test config") == {}


def test_errors_name_the_key_and_never_echo_the_value() -> None:
    with pytest.raises(InvalidOptionError) as info:
        validated(Root, {"section": {"port": "s3cr3t"}, "nmae": "b"}, "test config")
    message = str(info.value)
    assert message.startswith("Invalid test config: ")
    assert "section.port" in message
    assert "nmae" in message
    assert "s3cr3t" not in message


@pytest.mark.parametrize(
    ("name", "ok"), [("cpu", True), ("gpu:3", True), ("mps", True), ("cuda", False), ("cpu\n", False)]
)
def test_one_device_check(name: str, ok: bool) -> None:
    if ok:
        assert check_device(name) == name
    else:
        with pytest.raises(ValueError, match="use cpu, gpu"):
            check_device(name)
