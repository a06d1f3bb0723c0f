"""``raytseg serve``: starts its own local Ray, prints the URL, serves, and stops on SIGTERM
after the requests in flight are answered (new ones get 503)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

from tests.integration.conftest import free_port

# The subcommand as raytseg/cli.py wires it: a parser with register()'s subcommand.
MAIN = (
    "import argparse, sys; from raytseg.serve.cli import register; "
    "p = argparse.ArgumentParser(prog='raytseg'); register(p.add_subparsers(dest='command')); "
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))"
)


def test_serve_command_prints_url_serves_and_stops(
    weights: Path, tmp_path: Path, tiny_ct: bytes, ct: bytes
) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"weights: {weights}\ntorch_threads: 1\ntasks: {{total: {{modes: [fast]}}}}\n"
        "models: {num_cpus: 0.25}\npool: {enabled: false}\njobs: {enabled: false}\n"
        "preprocess: {num_cpus: 0.25}\npostprocess: {num_cpus: 0.25}\ningress: {num_cpus: 0.25}\n"
    )
    env = {**os.environ, "RAYTSEG_SERVE__HTTP__METRICS_EXPORT_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    args = [
        sys.executable,
        "-c",
        MAIN,
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--num-cpus",
        "2",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the app runs (or the command fails)
        assert first.startswith(f"raytseg serving on http://127.0.0.1:{port}"), first
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/segment", params={"fast": "true"}, content=tiny_ct, timeout=120
        )
        assert answer.status_code == 200, answer.text
        url = f"http://127.0.0.1:{port}/v1/segment"
        post = partial(httpx.post, url, params={"fast": "true"}, timeout=120)
        with ThreadPoolExecutor(3) as pool:  # in flight when SIGTERM arrives: they finish
            in_flight = [pool.submit(post, content=ct) for _ in range(3)]
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with contextlib.suppress(httpx.TransportError):  # already stopped: refused too
                late = post(content=tiny_ct)
                assert (late.status_code, late.headers.get("Retry-After")) == (503, "30"), late.text
            answers = [p.result() for p in in_flight]
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        raise AssertionError("the service still answers after SIGTERM")
    except httpx.TransportError:
        pass
