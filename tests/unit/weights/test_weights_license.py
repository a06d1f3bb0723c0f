from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raytseg.config import Settings
from raytseg.errors import LicenseError
from raytseg.tasks.registry import get_task
from raytseg.weights.license import LICENSE_URL, config_path, read_license, require_license, set_license

MakeSettings = Callable[..., Settings]
KEY = "aca_ABCDEFGHIJ1234"


def test_set_license_creates_a_totalsegmentator_config(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path)
    assert read_license(settings) is None
    set_license(KEY, settings)
    config = json.loads(config_path(settings).read_text())
    assert config_path(settings) == tmp_path / "tshome" / "config.json"
    assert re.fullmatch(r"totalseg_[A-Z0-9]{8}", config.pop("totalseg_id"))
    assert config == {"send_usage_stats": False, "prediction_counter": 0, "license_number": KEY}
    assert read_license(settings) == KEY


def test_set_license_keeps_the_other_keys(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path)
    config_path(settings).parent.mkdir(parents=True)
    existing = {"totalseg_id": "totalseg_ABCDEFGH", "send_usage_stats": True, "prediction_counter": 7}
    config_path(settings).write_text(json.dumps(existing | {"license_number": "aca_OLDOLDOLDOLD12"}))
    set_license(f"  {KEY}\n", settings)
    assert json.loads(config_path(settings).read_text()) == existing | {"license_number": KEY}
    assert [p.name for p in config_path(settings).parent.iterdir()] == ["config.json"]


@pytest.mark.parametrize("key", ["abc_ABCDEFGHIJ1234", "aca_SHORT", "aca_ABCDEFGHIJ12345", ""])
def test_malformed_keys_are_refused_with_the_rules(
    tmp_path: Path, settings_for: MakeSettings, key: str
) -> None:
    settings = settings_for(tmp_path)
    with pytest.raises(LicenseError, match="starts with 'aca_' and has exactly 18 characters"):
        set_license(key, settings)
    assert not config_path(settings).exists()


def test_require_license_for_a_licensed_task(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path)
    task = get_task("appendicular_bones")
    with pytest.raises(LicenseError) as info:
        require_license(task, settings)
    assert LICENSE_URL in str(info.value)
    assert "raytseg set-license -l aca_" in str(info.value)
    set_license(KEY, settings)
    assert require_license(task, settings) == KEY


def test_require_license_checks_the_length_offline_like_totalsegmentator(
    tmp_path: Path, settings_for: MakeSettings
) -> None:
    settings = settings_for(tmp_path)
    config_path(settings).parent.mkdir(parents=True)
    config_path(settings).write_text(json.dumps({"license_number": "aca_TOOSHORT"}))
    with pytest.raises(LicenseError, match="invalid"):
        require_license(get_task("appendicular_bones"), settings)
    # TotalSegmentator only checks the length at run time; so does raytseg.
    config_path(settings).write_text(json.dumps({"license_number": "xyz_ABCDEFGHIJ1234"}))
    assert require_license(get_task("appendicular_bones"), settings) == "xyz_ABCDEFGHIJ1234"


def test_require_license_for_an_open_task_needs_none(tmp_path: Path, settings_for: MakeSettings) -> None:
    assert require_license(get_task("total"), settings_for(tmp_path)) == ""


def test_corrupt_config_is_a_license_error(tmp_path: Path, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path)
    config_path(settings).parent.mkdir(parents=True)
    config_path(settings).write_text("{not json")
    with pytest.raises(LicenseError, match="not valid JSON"):
        read_license(settings)


def test_online_validation(tmp_path: Path, http_server: Any, settings_for: MakeSettings) -> None:
    settings = settings_for(tmp_path, http_server.url)
    http_server.serve_json("/is_valid_license_number", {"status": "invalid_license"})
    with pytest.raises(LicenseError, match="rejects the key"):
        set_license(KEY, settings, validate_online=True)
    assert read_license(settings) is None
    http_server.serve_json("/is_valid_license_number", {"status": "valid_license"})
    set_license(KEY, settings, validate_online=True)
    assert read_license(settings) == KEY
    assert [json.loads(body) for _, _, body in http_server.requests] == [{"license_number": KEY}] * 2
