"""Small HTTP helpers on the standard library (no requests dependency).

``urllib.error.HTTPError`` is passed to the caller, which knows what a status means
(a 403 from the license server is a license problem, a 404 from GitHub a missing
release); every other network failure becomes ``StorageError``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raytseg.errors import StorageError, UnsafeArchiveError

TIMEOUT_S = 60.0  # per socket operation, not for the whole download
_CHUNK = 1024 * 1024
_USER_AGENT = "raytseg (TotalSegmentator-compatible weights client)"


def _request(url: str, json_body: dict[str, Any] | None) -> urllib.request.Request:
    headers = {"User-Agent": _USER_AGENT}
    if json_body is None:
        return urllib.request.Request(url, headers=headers)
    headers["Content-Type"] = "application/json"
    data = json.dumps(json_body).encode()
    return urllib.request.Request(url, data=data, headers=headers, method="POST")


def download(
    url: str,
    dest: Path,
    *,
    json_body: dict[str, Any] | None = None,
    max_bytes: int,
    timeout: float = TIMEOUT_S,
) -> None:
    """Stream ``url`` (GET, or POST of ``json_body``) into ``dest``, at most ``max_bytes`` bytes.

    Raises:
        urllib.error.HTTPError: the server answered with an error status.
        StorageError: any other network or disk failure.
        UnsafeArchiveError: the body is larger than ``max_bytes``.
    """
    try:
        with (
            urllib.request.urlopen(_request(url, json_body), timeout=timeout) as response,
            dest.open("wb") as f,
        ):
            written = 0
            while chunk := response.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise UnsafeArchiveError(
                        f"{url} sends more than {max_bytes} bytes (RAYTSEG_MAX_ARCHIVE_BYTES); "
                        "download refused."
                    )
                f.write(chunk)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(f"Download of {url} failed: {reason}. Check the network connection.") from exc


def post_json(url: str, body: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """POST ``body`` as JSON and return the JSON answer (HTTPError passes through)."""
    try:
        with urllib.request.urlopen(_request(url, body), timeout=timeout) as response:
            answer = json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(f"Request to {url} failed: {reason}. Check the network connection.") from exc
    return answer if isinstance(answer, dict) else {}


def error_detail(exc: urllib.error.HTTPError) -> str:
    """A short text from an error response body (JSON ``message``/``status`` or raw text)."""
    try:
        raw = exc.read(4096).decode(errors="replace")
    except OSError:
        return ""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw.strip()[:300]
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("status") or parsed)[:300]
    return str(parsed)[:300]
