"""Fixtures for the weights tests: settings in a temporary folder, tiny synthetic models,
weight zips, and a local HTTP server on 127.0.0.1 standing in for GitHub and the
TotalSegmentator license server. Helpers reach tests as fixtures (pytest runs with
``--import-mode=importlib``, so tests cannot import this module)."""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raytseg.config import Settings

TOTAL_3MM = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TOTAL_6MM = "Dataset298_TotalSegmentator_total_6mm_1559subj"
ORGANS = "Dataset291_TotalSegmentator_part1_organs_1559subj"
BODY_6MM = "Dataset300_body_6mm_1559subj"
APPENDICULAR = "Dataset304_appendicular_bones_ext_1559subj"


def make_settings(tmp_path: Path, url: str | None = None, **env: str) -> Settings:
    """Settings whose every folder lies under ``tmp_path`` (and whose servers are ``url``)."""
    base = {
        "HOME": str(tmp_path / "home"),
        "TOTALSEG_HOME_DIR": str(tmp_path / "tshome"),
        "RAYTSEG_WEIGHTS": str(tmp_path / "weights"),
        "RAYTSEG_CACHE_DIR": str(tmp_path / "cache"),
    }
    if url is not None:
        base |= {"RAYTSEG_WEIGHTS_URL": url, "RAYTSEG_LICENSE_SERVER": url}
    return Settings.from_env(base | env)


def zip_folders(root: Path, names: list[str], archive: Path) -> Path:
    """A zip holding ``root/<name>`` folders at its top level, as TotalSegmentator's release zips."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            for path in sorted((root / name).rglob("*")):
                zf.write(path, path.relative_to(root).as_posix())
    return archive


def leftovers(root: Path) -> list[str]:
    """Everything in a store root (after a failure there must be nothing)."""
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@dataclass
class Route:
    status: int
    body: bytes
    content_type: str = "application/zip"


@dataclass
class FakeServer:
    """Routes by path; records every request as (method, path, body)."""

    url: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)

    def serve(self, path: str, body: bytes, status: int = 200, content_type: str = "application/zip") -> None:
        self.routes[path] = Route(status, body, content_type)

    def serve_json(self, path: str, payload: object, status: int = 200) -> None:
        self.serve(path, json.dumps(payload).encode(), status, "application/json")


def handler_for(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append((self.command, self.path, body))
            route = state.routes.get(self.path, Route(404, b'{"message": "Not Found"}', "application/json"))
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        do_GET = _answer  # noqa: N815
        do_POST = _answer  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic 297, 298, 291, 300 and 304 folders (read-only for tests: copy before changing)."""
    from raytseg.tasks.registry import get_task
    from raytseg.weights.synth import synthesize, synthesize_task

    root = tmp_path_factory.mktemp("tiny")
    synthesize_task("total", root, fast=True, tiny=True)  # 297, 298
    synthesize_task("body", root, fast=True, tiny=True)  # 300
    organs = get_task("total").modes["default"].models[0]
    synthesize(organs, ORGANS, root, modality="CT", target_spacing_xyz=(1.5, 1.5, 1.5), tiny=True, seed=291)
    synthesize_task("appendicular_bones", root, tiny=True, with_crop_models=False)  # 304
    return root


@pytest.fixture
def copy_models(tiny_root: Path) -> Callable[[Path, list[str]], Path]:
    """Copy some tiny dataset folders into a store root."""

    def copy(dest: Path, names: list[str]) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copytree(tiny_root / name, dest / name)
        return dest

    return copy


@pytest.fixture
def http_server() -> Iterator[FakeServer]:
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def settings_for() -> Callable[..., Settings]:
    """``settings_for(tmp_path, url=None, **env)``: every folder under ``tmp_path``."""
    return make_settings


@pytest.fixture
def zipper() -> Callable[[Path, list[str], Path], Path]:
    """``zipper(root, names, archive)``: zip ``root/<name>`` folders at the archive's top."""
    return zip_folders
