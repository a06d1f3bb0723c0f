"""A zip bomb sent to the service is refused before it is expanded, in a replica under 1 GB."""

from __future__ import annotations

from pathlib import Path

import httpx

GIB_KB = 1 << 20


def _peak_rss_kb(title: str) -> list[int]:
    """VmHWM (peak resident set since start) of every process whose command line has ``title``."""
    peaks = []
    for proc in Path("/proc").iterdir():
        try:
            if title not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            status = (proc / "status").read_text()
        except OSError:  # the process ended while we looked
            continue
        peaks += [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    return peaks


def test_a_zip_bomb_is_refused_by_the_loading_replica_without_expanding_it(
    api: httpx.Client, dicom_zip_bomb: Path
) -> None:
    answer = api.post("/v1/segment", params={"fast": "true"}, content=dicom_zip_bomb.read_bytes())
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "UnsafeArchiveError"
    assert "zz_padding.dcm" in error["message"]
    peaks = _peak_rss_kb("ServeReplica:raytseg:Preprocess")  # the stage that loads uploads
    assert peaks, "no Preprocess replica process found"
    assert max(peaks) < GIB_KB, f"peak RSS {max(peaks) / 1024:.0f} MiB"
