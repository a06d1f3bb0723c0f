"""What importing the service's light modules pulls in: neither Ray nor torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = [
    "raytseg.serve",
    "raytseg.serve.cli",
    "raytseg.serve.config",
    "raytseg.serve.errors",
    "raytseg.client",
]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_neither_ray_nor_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_subcommand_registers() -> None:
    import argparse

    from raytseg.serve.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--config", "s.yaml", "--port", "9000", "--device", "cpu"])
    assert (args.command, str(args.config), args.port, args.device) == ("serve", "s.yaml", 9000, "cpu")
    assert callable(args.handler)
