"""``raytseg serve``: the HTTP service on a Ray started here, until Ctrl-C.

    raytseg serve [--config serve.yaml] [--host 127.0.0.1] [--port 8000] [--device cpu]

``register(subparsers)`` adds the subcommand to the ``raytseg`` parser. Importing this
module imports neither Ray nor torch; the command does, when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``serve`` to ``raytseg``'s subcommands (``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "serve",
        help="Run the HTTP service on a local Ray (127.0.0.1) until Ctrl-C.",
        description="Start Ray on this machine, deploy the raytseg Serve app, print its URL and "
        "serve until interrupted. Configuration: --config, RAYTSEG_SERVE_CONFIG, RAYTSEG_SERVE__* variables.",
    )
    p.add_argument("--config", type=Path, help="ServeConfig YAML file.")
    p.add_argument("--host", help="Address to listen on (default 127.0.0.1).")
    p.add_argument("--port", type=int, help="HTTP port (default 8000).")
    p.add_argument("--device", help="cpu, gpu or gpu:N for the models (default gpu, else cpu).")
    p.add_argument("--num-cpus", type=int, help="Logical CPUs of the local Ray (default: all).")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from raytseg.config import environment
    from raytseg.serve.config import load_config
    from raytseg.serve.local import drain_local, start_local, stop_local
    from raytseg.serve.runtime import check_weights

    source: dict[str, Any] = {}
    if args.config is not None:
        source["config_file"] = str(args.config)
    http = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if http:
        source["http"] = http
    if args.device:
        source["device"] = args.device
    config = load_config(source, environment())
    check_weights(config)  # at once, not after Serve has restarted the failing replicas for ever
    stop, service = threading.Event(), None
    try:
        options = {} if args.num_cpus is None else {"num_cpus": args.num_cpus}
        service = start_local(config, **options)
        _stop_on_sigterm(stop)  # after ray.init, which installs a SIGTERM handler of its own
        print(f"raytseg serving on {service.url}  (API docs: {service.url}/docs)", flush=True)
        if service.metrics_url:
            print(f"Prometheus metrics: {service.metrics_url}", flush=True)
        print("Press Ctrl-C to stop.", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if service is not None:  # requests and jobs in flight finish first
            drain_local(service.config)
        stop_local()
    return 0


def _stop_on_sigterm(stop: threading.Event) -> None:
    """Treat SIGTERM (container stop) like Ctrl-C: refuse new requests, let those in flight
    finish (``graceful_shutdown_timeout_s`` at most), then shut Serve and Ray down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
