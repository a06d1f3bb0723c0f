"""No read follows a redirect: a job's locations are checked against the allow-list by
their URI, and a redirect could lead anywhere. A real HTTP server on 127.0.0.1 redirects
everything under /allowed/redirect/ to /private/; the test shows /private/ is never asked."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from raytseg import dicomweb, storage
from raytseg.errors import StorageError
from raytseg.pipeline.load import LoadLimits, load_volume

BODY = b"not an image, just bytes to read back " * 100


LIMITS = LoadLimits(max_voxels=10**8, max_archive_bytes=1 << 30)


class _Server(http.server.ThreadingHTTPServer):
    asked: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.asked.append(self.path)
        if self.path.startswith("/allowed/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/private/" + self.path.removeprefix("/allowed/redirect/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = BODY
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815 - http.server's name

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.asked = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_http_reads_work_and_refuse_redirects(server: _Server) -> None:
    assert storage.read_bytes(_url(server, "/allowed/ct.nii.gz")) == BODY
    with pytest.raises(StorageError, match="does not follow redirects") as refused:
        storage.read_bytes(_url(server, "/allowed/redirect/ct.nii.gz"))
    assert "/private/ct.nii.gz" in str(refused.value)  # where it would have gone, for the user
    with pytest.raises(StorageError, match="does not follow redirects"):
        load_volume(_url(server, "/allowed/redirect/ct.nii.gz"), LIMITS)  # segment -i, jobs, batch
    assert not [path for path in server.asked if path.startswith("/private/")], server.asked


def test_dicomweb_reads_refuse_redirects(server: _Server) -> None:
    study = "dicomweb+" + _url(server, "/allowed/redirect/dicom-web/studies/1.2.3")
    with pytest.raises(StorageError, match="does not follow redirects"):
        dicomweb.find_series(study)
    assert server.asked  # the server was asked, and only where the URI pointed
    assert not [path for path in server.asked if path.startswith("/private/")], server.asked
