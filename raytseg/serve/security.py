"""Bearer tokens and the URI allow-list of the job API.

Tokens come from an environment variable (a Kubernetes Secret via ``envFrom``) and/or a
mounted secret file, never from the serve config; they are compared in constant time and
never logged. Job URIs must lie under a configured prefix after normalisation, so
``..``, symlinks, ``file://`` spellings and look-alike bucket names cannot escape it.
"""

from __future__ import annotations

import hmac
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raytseg.errors import InvalidOptionError, UnauthorizedError, UriNotAllowedError
from raytseg.serve.config import AuthSpec

_MIN_TOKEN_CHARS = 16


def load_tokens(auth: AuthSpec, environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The accepted tokens: comma-separated in ``auth.token_env``, one per line in ``auth.token_file``.

    Raises:
        InvalidOptionError: the file cannot be read, a token is shorter than 16 characters,
            or ``auth.required`` and no token was found. Messages never contain tokens.
    """
    found = [t.strip() for t in environ.get(auth.token_env, "").split(",")]
    if auth.token_file is not None:
        try:
            lines = auth.token_file.read_text().splitlines()
        except OSError as exc:
            problem = exc.strerror
            raise InvalidOptionError(f"Cannot read the token file {auth.token_file}: {problem}") from None
        found += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    tokens = tuple(dict.fromkeys(t for t in found if t))
    if any(len(t) < _MIN_TOKEN_CHARS for t in tokens):
        raise InvalidOptionError(f"API tokens must have at least {_MIN_TOKEN_CHARS} characters.")
    if auth.required and not tokens:
        raise InvalidOptionError(
            f"auth.required is set but no token was found in ${auth.token_env} or auth.token_file."
        )
    return tuple(t.encode() for t in tokens)


def check_bearer(authorization: str | None, tokens: Sequence[bytes]) -> None:
    """Accept the request when no tokens are configured or its bearer token is one of them.

    Raises:
        UnauthorizedError: missing header, another scheme, or an unknown token.
    """
    if not tokens:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise UnauthorizedError("Send 'Authorization: Bearer <token>' with an API token.")
    candidate = presented.strip().encode()
    # Compare with every token, so the time taken does not tell which one nearly matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    if not matched:
        raise UnauthorizedError("The API token is not valid.")


_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class UriPolicy:
    """Where jobs may read and write: normalised locations under one of ``prefixes``."""

    prefixes: tuple[str, ...]

    def check(self, location: str, what: str) -> str:
        """``location`` normalised (local paths absolute, symlinks resolved) if it is allowed.

        Raises:
            UriNotAllowedError: outside every prefix, or not normalisable (``..``, ``?``, ``#``).
        """
        normal = normalise_location(location, what)
        for prefix in self.prefixes:
            base = normalise_location(prefix, "allowed prefix")
            if normal.rstrip("/") == base.rstrip("/") or normal.startswith(base.rstrip("/") + "/"):
                return normal
        allowed = ", ".join(self.prefixes) or "none are configured (jobs.allowed_prefixes)"
        raise UriNotAllowedError(f"The {what} is outside the allowed locations; allowed: {allowed}.")


def normalise_location(location: str, what: str) -> str:
    """A canonical spelling: ``scheme://path`` without dot segments, or a resolved local path."""
    if any(c in location for c in "\x00\\?#") or not location.strip():
        raise UriNotAllowedError(f"The {what} contains characters that are not allowed in a job URI.")
    if _ENCODED_SEPARATOR.search(location):  # decoded by some servers into '..' or '/'
        raise UriNotAllowedError(f"The {what} must not contain percent-encoded dots, slashes or backslashes.")
    if location.startswith("file://"):
        location = location[len("file://") :]
    if "://" not in location:
        if not location.startswith("/"):
            raise UriNotAllowedError(f"The {what} must be an absolute path or a URI.")
        return os.path.realpath(location)
    scheme, path = location.split("://", 1)
    segments = path.split("/")
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        raise UriNotAllowedError(f"The {what} must not contain '.', '..' or empty path segments.")
    normal = posixpath.normpath(path) if path else ""
    return f"{scheme.lower()}://{normal}" + ("/" if path.endswith("/") else "")
