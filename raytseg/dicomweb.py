"""DICOMweb: series read with WADO-RS, found with QIDO-RS, outputs stored with STOW-RS.

A DICOMweb location is the server's base URL with ``dicomweb+`` before its scheme, so it
cannot be mistaken for a file on a web server:

    dicomweb+https://pacs.example.org/dicom-web                                a server
    dicomweb+https://pacs.example.org/dicom-web/studies/<uid>/series/<uid>     one series
    dicomweb+https://pacs.example.org/dicom-web/studies/<uid>                  a study's series
    dicomweb+https://pacs.example.org/dicom-web/series?Modality=CT             a QIDO-RS search

A series is an input like a DICOM folder; a study or a search is a batch's input set; a
server is where DICOM outputs are stored (``--dicomweb_store``). Credentials come from
``config.dicomweb_headers`` (environment or mounted secret), never from the URI.

Transfers use dicomweb-client with timeouts. Connection failures, timeouts, 408, 429 and
5xx answers raise ``StorageError`` chained to the network error, which ``raytseg.retry``
treats as transient; other refusals raise it unchained (another try cannot help).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from raytseg.errors import ImageTooLargeError, InvalidOptionError, StorageError, UnreadableImageError
from raytseg.retry import RetryPolicy
from raytseg.storage import REDIRECT_ADVICE

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
FORMS = "dicomweb+https://host/prefix[/studies/<uid>[/series[/<uid>]]] or dicomweb+https://host/prefix/series?<filters>"
# Connect, then read: a server that stops answering mid-transfer fails the try instead of hanging it.
_TIMEOUT_S = (10.0, 300.0)
# Ask for the instances as stored: servers need not transcode (Orthanc cannot transcode JPEG 2000).
_AS_STORED = (("application/dicom", "*"),)
_TRANSIENT_STATUS = {408, 425, 429}
_UID = r"[0-9][0-9.]{0,63}"
_PATH = re.compile(
    rf"(?P<prefix>.*?)(?:/studies/(?P<study>{_UID})(?P<listing>/series)?(?:/(?P<series>{_UID}))?|(?P<all>/series))?/?"
)
_STUDY, _SERIES, _SOP, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"


@dataclass(frozen=True)
class DicomwebLocation:
    """A parsed DICOMweb URI: the server's base URL and what under it."""

    base: str  # http(s)://host[:port]/prefix, as dicomweb-client takes it
    study: str | None = None
    series: str | None = None
    all_series: bool = False  # .../series: a search over every study
    filters: tuple[tuple[str, str], ...] = ()  # QIDO-RS search parameters

    @property
    def is_server(self) -> bool:
        return self.study is None and not self.all_series

    def series_uri(self, study: str, series: str) -> str:
        return f"dicomweb+{self.base}/studies/{study}/series/{series}"


def is_dicomweb(location: object) -> bool:
    """True for ``dicomweb+http(s)://`` locations."""
    return str(location).lower().startswith(SCHEMES)


def parse(uri: str) -> DicomwebLocation:
    """The parts of a DICOMweb URI.

    Raises:
        InvalidOptionError: not one of the forms in this module's docstring, or with
            credentials in it (use the environment instead).
    """
    if not is_dicomweb(uri):
        raise InvalidOptionError(f"{uri!r} is not a DICOMweb URI. Use {FORMS}.")
    parts = urlsplit(uri[len("dicomweb+") :])
    if parts.username or parts.password:
        raise InvalidOptionError(
            "A DICOMweb URI must not hold credentials: set RAYTSEG_DICOMWEB_TOKEN, or "
            "RAYTSEG_DICOMWEB_USER and RAYTSEG_DICOMWEB_PASSWORD, instead."
        )
    match = _PATH.fullmatch(parts.path)
    resources = {"studies", "series", "instances"}  # in a prefix: a resource path that did not parse
    if not parts.hostname or match is None or parts.fragment or resources & set(match["prefix"].split("/")):
        raise InvalidOptionError(f"{uri!r} is not a DICOMweb URI that raytseg understands. Use {FORMS}.")
    searches = bool(match["all"] or match["listing"]) and match["series"] is None
    if parts.query and not searches:
        raise InvalidOptionError(f"{uri!r}: search filters (?...) belong after '/series'. Use {FORMS}.")
    filters = tuple(parse_qsl(parts.query, keep_blank_values=True))
    base = f"{parts.scheme}://{parts.netloc}{match['prefix']}"
    return DicomwebLocation(base, match["study"], match["series"], bool(match["all"]), filters)


# --- reading ------------------------------------------------------------------------


def read_series(uri: str, max_voxels: int, max_bytes: int) -> list[Any]:
    """Every instance of the series ``uri`` names (pydicom datasets), fetched with WADO-RS.

    Refused while streaming, before it is all in memory, once the instances' pixels pass
    ``max_voxels`` or their pixel data ``max_bytes``.

    Raises:
        InvalidOptionError: ``uri`` does not name one series.
        ImageTooLargeError: past the limits above.
        UnreadableImageError: the series holds no instance.
        StorageError: the server could not be reached or refused.
    """
    where = parse(uri)
    if where.study is None or where.series is None:
        raise InvalidOptionError(f"{uri!r} does not name one series: use .../studies/<uid>/series/<uid>.")
    datasets: list[Any] = []
    voxels = size = 0
    with _answers("read the series", uri):
        for dataset in _client(where.base).iter_series(where.study, where.series, media_types=_AS_STORED):
            voxels += _voxels(dataset)
            size += len(dataset.get("PixelData", b"") or b"")
            if voxels > max_voxels or size > max_bytes:
                raise ImageTooLargeError(
                    f"{uri} holds more than {max_voxels} voxels or {max_bytes} bytes of pixel data. "
                    "Raise RAYTSEG_MAX_VOXELS / RAYTSEG_MAX_ARCHIVE_BYTES if it is genuine."
                )
            datasets.append(dataset)
    if not datasets:
        raise UnreadableImageError(f"{uri} holds no instances. Check the series UID.")
    return datasets


def find_series(uri: str) -> list[str]:
    """The series URIs a study or a QIDO-RS search names (a series names itself), sorted.

    Raises:
        InvalidOptionError: ``uri`` names a server, not a study, series or search.
        StorageError: the server could not be reached or refused.
    """
    where = parse(uri)
    if where.series is not None:
        return [uri]
    if where.is_server:
        raise InvalidOptionError(f"{uri!r} names a server: add /studies/<uid> or /series?<filters>.")
    with _answers("search for series", uri):
        found = _client(where.base).search_for_series(
            study_instance_uid=where.study, search_filters=dict(where.filters), get_remaining=True
        )
    return sorted({where.series_uri(_value(row, _STUDY), _value(row, _SERIES)) for row in found})


# --- storing ------------------------------------------------------------------------


def store(server: str, instances: Sequence[bytes], retry: RetryPolicy | None = None) -> list[str]:
    """STOW-RS each instance (DICOM Part 10 bytes) to ``server``; returns their URIs.

    An instance the server already holds (a QIDO-RS search finds its SOP Instance UID) is
    not sent again, so a rerun stores nothing twice whatever the server's duplicate policy.
    Each instance is retried on transient errors; it counts as stored only when the
    server's answer lists it among the stored instances.

    Raises:
        InvalidOptionError: ``server`` is not a server URI.
        StorageError: an instance was refused, or the server stayed unreachable.
    """
    where = parse(server)
    if not where.is_server:
        raise InvalidOptionError(f"{server!r}: store outputs to a server URI ({SCHEMES[1]}host/prefix).")
    retry = retry or RetryPolicy()
    client = _client(where.base)
    stored = []
    for blob in instances:
        dataset = _read_part10(blob)
        uids = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
        uri = f"{where.series_uri(uids[0], uids[1])}/instances/{uids[2]}"
        retry.call(functools.partial(_store_once, client, dataset, uids, uri), f"Storing {uri}")
        stored.append(uri)
    return stored


def _store_once(client: Any, dataset: Any, uids: tuple[str, str, str], uri: str) -> None:
    """One try: nothing if the server holds the instance, else STOW-RS and check the answer."""
    with _answers("look for the instance", uri):
        found = client.search_for_instances(uids[0], uids[1], search_filters={"SOPInstanceUID": uids[2]})
    if any(_value(row, _SOP) == uids[2] for row in found):
        return
    with _answers("store the instance", uri):
        answer = client.store_instances([dataset], study_instance_uid=uids[0])
    failed = [str(item.get("FailureReason", "?")) for item in answer.get("FailedSOPSequence", [])]
    accepted = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
    if failed or uids[2] not in accepted:
        raise StorageError(
            f"The DICOMweb server did not store {uri} "
            f"(failure reasons: {', '.join(failed) or 'none given'}). Check the server's log."
        )


def _read_part10(blob: bytes) -> Any:
    import pydicom

    return pydicom.dcmread(io.BytesIO(blob))


# --- the client ---------------------------------------------------------------------


def _client(base: str) -> Any:
    import requests
    from dicomweb_client.api import DICOMwebClient

    from raytseg.config import dicomweb_headers

    # Redirects are not followed (requests raises TooManyRedirects): a job's DICOMweb URIs
    # are checked against jobs.allowed_prefixes, and a redirect could lead anywhere.
    session = requests.Session()
    session.max_redirects = 0
    client = DICOMwebClient(base, session=session, headers=dicomweb_headers(), timeout=_TIMEOUT_S)
    client.set_http_retry_params(retry=False)  # raytseg.retry decides, with its own backoff
    return client


@contextmanager
def _answers(what: str, where: str) -> Iterator[None]:
    """Network failures as ``StorageError``: chained when another try may succeed."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = 0 if exc.response is None else exc.response.status_code
        message = f"The DICOMweb server answered {status} when asked to {what} at {where}"
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise StorageError(f"{message}; try again later.") from exc
        advice = (
            "Check RAYTSEG_DICOMWEB_TOKEN or RAYTSEG_DICOMWEB_USER/PASSWORD."
            if status in (401, 403)
            else "Check the URI."
        )
        raise StorageError(f"{message}. {advice}") from None
    except requests.TooManyRedirects:
        raise StorageError(
            f"The DICOMweb server redirected the request to {what} at {where}. {REDIRECT_ADVICE}"
        ) from None
    except requests.RequestException as exc:  # refused connections, timeouts
        raise StorageError(f"Could not reach the DICOMweb server to {what} at {where}: {exc}") from exc


def _value(row: dict[str, Any], tag: str) -> str:
    values = row.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _voxels(dataset: Any) -> int:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    return int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0) * frames
