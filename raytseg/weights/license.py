"""TotalSegmentator-compatible license key handling.

The key lives where TotalSegmentator keeps it, ``<totalseg_home>/config.json`` under
``"license_number"``, so a key set with ``totalseg_set_license`` works here and the other
way round. Other keys in that file are kept. raytseg never sends usage statistics: a
config file it creates says ``"send_usage_stats": false``.

At run time a licensed task only checks the key offline, exactly as TotalSegmentator's
``has_valid_license_offline`` does (a string of 18 characters); the license server
checks it again when the weights are downloaded.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import urllib.error
from pathlib import Path
from typing import Any

from raytseg import storage
from raytseg.config import Settings
from raytseg.errors import LicenseError, StorageError
from raytseg.tasks.registry import TaskSpec
from raytseg.weights import _http

logger = logging.getLogger(__name__)

LICENSE_URL = "https://backend.totalsegmentator.com/license-academic/"
LICENSE_PREFIX = "aca_"
LICENSE_LENGTH = 18
CONFIG_FILE = "config.json"
SET_LICENSE_COMMAND = "raytseg set-license -l aca_…"


def config_path(settings: Settings) -> Path:
    """TotalSegmentator's ``config.json``."""
    return settings.totalseg_home / CONFIG_FILE


def check_license_format(key: str) -> None:
    """TotalSegmentator's rules for a key: starts with ``aca_``, exactly 18 characters."""
    if not key.startswith(LICENSE_PREFIX) or len(key) != LICENSE_LENGTH:
        raise LicenseError(
            f"Invalid license key {key!r}: a key starts with {LICENSE_PREFIX!r} and has exactly "
            f"{LICENSE_LENGTH} characters. Copy it from the license e-mail (get one at {LICENSE_URL}) "
            f"and run: {SET_LICENSE_COMMAND}"
        )


def set_license(key: str, settings: Settings, *, validate_online: bool = False) -> None:
    """Store a license key in ``config.json`` (created with TotalSegmentator's keys if absent).

    Args:
        key: the academic license key, ``aca_`` followed by 14 characters.
        settings: gives the TotalSegmentator home folder.
        validate_online: also ask the license server whether the key is valid.

    Raises:
        LicenseError: malformed key, or the server rejects it.
        StorageError: the config file cannot be read or written.

    Example:
        >>> set_license("aca_ABCDEFGHIJKLMN", Settings.from_env())  # doctest: +SKIP
    """
    key = key.strip()
    check_license_format(key)
    if validate_online:
        _validate_online(key, settings)
    config = _read_config(settings) or _new_config()
    config["license_number"] = key
    storage.write_bytes(config_path(settings), (json.dumps(config, indent=4) + "\n").encode())
    logger.info("License key stored in %s", config_path(settings))


def read_license(settings: Settings) -> str | None:
    """The stored license key, or None when there is none."""
    config = _read_config(settings)
    if config is None:
        return None
    key = config.get("license_number")
    return key if isinstance(key, str) and key else None


def require_license(task_spec: TaskSpec, settings: Settings) -> str:
    """The license key for a licensed task (``""`` for tasks that need none).

    Raises:
        LicenseError: the task needs a license and none, or a malformed one, is stored.
    """
    if not task_spec.license_required:
        return read_license(settings) or ""
    key = read_license(settings)
    if key is None:
        raise LicenseError(
            f"Task {task_spec.name!r} needs a license, and none is set. Academic licenses are free: "
            f"get one at {LICENSE_URL}, then run: {SET_LICENSE_COMMAND}"
        )
    if len(key) != LICENSE_LENGTH:
        raise LicenseError(
            f"Task {task_spec.name!r} needs a license, and the stored key {key!r} in {config_path(settings)} "
            f"is invalid (not {LICENSE_LENGTH} characters). Set a valid one: {SET_LICENSE_COMMAND} "
            f"(get one at {LICENSE_URL})."
        )
    return key


def _new_config() -> dict[str, Any]:
    alphabet = string.ascii_uppercase + string.digits
    suffix = "".join(secrets.choice(alphabet) for _ in range(8))
    return {"totalseg_id": f"totalseg_{suffix}", "send_usage_stats": False, "prediction_counter": 0}


def _read_config(settings: Settings) -> dict[str, Any] | None:
    path = config_path(settings)
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise LicenseError(
            f"{path} is not valid JSON ({exc}); fix or delete it, then run: {SET_LICENSE_COMMAND}"
        ) from exc
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise LicenseError(f"{path} does not hold a JSON object; fix or delete it.")
    return config


def _validate_online(key: str, settings: Settings) -> None:
    url = f"{settings.license_server.rstrip('/')}/is_valid_license_number"
    try:
        answer = _http.post_json(url, {"license_number": key})
    except urllib.error.HTTPError as exc:
        raise LicenseError(
            f"The license server could not check the key (HTTP {exc.code}: {_http.error_detail(exc)}). "
            "Retry later, or store the key without the online check."
        ) from exc
    if answer.get("status") != "valid_license":
        raise LicenseError(
            f"The license server rejects the key {key!r}. Check it against the license e-mail, "
            f"or get one at {LICENSE_URL}."
        )
