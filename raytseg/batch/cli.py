"""``raytseg batch`` and ``python -m raytseg.batch``: flags and a YAML config, one job.

    raytseg batch --input s3://bucket/cts/ --output s3://bucket/seg/ -ta total --fast
    python -m raytseg.batch --config job.yaml [flags that override it]

Exit status: 0 when failures stay within ``--max-failures``, 3 when they exceed it, 1 when
the job cannot start (bad config, nothing to segment, unknown task). Importing this module
imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from raytseg.errors import InvalidOptionError

EXIT_TOO_MANY_FAILURES = 3
_SUPPRESS: Any = argparse.SUPPRESS  # only flags the user gives override the config file


def register(subparsers: Any) -> None:
    """Add the ``batch`` subcommand to ``raytseg``'s subparsers."""
    parser = subparsers.add_parser(
        "batch", help="Segment every image under a prefix or in a manifest, on Ray (local or a cluster)."
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_command)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="Job config (YAML); flags given here override its values.")
    p.add_argument("--input", default=_SUPPRESS, help="Prefix (folder, URI) to list, or a manifest.")
    p.add_argument("--output", default=_SUPPRESS, help="Where <id>/ folders and the results table go.")
    p.add_argument("--results", default=_SUPPRESS, help="Results table (default <output>/_results.parquet).")
    _segment_flags(p)
    p.add_argument("--address", default=_SUPPRESS, help="Ray cluster to join (default: a local Ray).")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, default=_SUPPRESS, help="CPUs of the local Ray.")
    p.add_argument(
        "--model-concurrency", type=int, nargs=2, metavar=("MIN", "MAX"), default=_SUPPRESS,
        help="Model actors (min, max).",
    )  # fmt: skip
    p.add_argument("--num-gpus", type=float, default=_SUPPRESS, help="GPUs per model actor (fraction ok).")
    p.add_argument("--overwrite", action="store_true", default=_SUPPRESS, help="Redo complete items.")
    p.add_argument(
        "--max-failures", default=_SUPPRESS, help="Failures tolerated: a count (5) or fraction (0.05, 5%%)."
    )
    p.add_argument("--retries", type=int, default=_SUPPRESS, help="Retries of an item whose worker died.")
    p.add_argument("-q", "--quiet", action="store_true", help="Only the summary and failures.")
    p.add_argument("-v", "--verbose", action="store_true", help="More output, worker logs included.")


def _segment_flags(p: argparse.ArgumentParser) -> None:
    """``raytseg segment``'s flags, spelled the same."""
    flag = {"action": "store_true", "default": _SUPPRESS}
    p.add_argument("-ta", "--task", default=_SUPPRESS, help="Task name (see: raytseg tasks).")
    p.add_argument("-ml", "--ml", help="One multilabel file per item: <id>/segmentation.nii.gz.", **flag)
    p.add_argument("-f", "--fast", help="Lower-resolution model (3 mm).", **flag)
    p.add_argument("-ff", "--fastest", help="Lowest-resolution model (6 mm).", **flag)
    p.add_argument("-rs", "--roi_subset", nargs="+", default=_SUPPRESS, help="Only predict these classes.")
    p.add_argument("-rsr", "--roi_subset_robust", nargs="+", default=_SUPPRESS, help="Same, 3 mm crop.")
    p.add_argument("-rc", "--robust_crop", help="Find crop regions with the 3 mm model.", **flag)
    p.add_argument("-s", "--statistics", help="Write statistics.json per item.", **flag)
    p.add_argument("-sii", "--stats_include_incomplete", help="Stats for border classes.", **flag)
    p.add_argument("-sa", "--stats_aggregation", choices=["mean", "median"], default=_SUPPRESS)
    p.add_argument("-bs", "--body_seg", help="Crop to the body first (CT).", **flag)
    p.add_argument("-fs", "--force_split", help="Predict in three z chunks.", **flag)
    p.add_argument("-rmb", "--remove_small_blobs", nargs="?", const=200.0, type=float, default=_SUPPRESS)
    p.add_argument(
        "-ndm", "--no_derived_masks", dest="derived_masks", action="store_false", default=_SUPPRESS,
        help="No body.nii.gz/skin.nii.gz.",
    )  # fmt: skip
    p.add_argument("-p", "--preview", help="Also write preview_<task>.png per item.", **flag)
    p.add_argument("-d", "--device", default=_SUPPRESS, help="cpu, gpu, gpu:N or mps (default: gpu).")


def run_command(args: argparse.Namespace) -> int:
    """Run the job the arguments describe; print progress and a summary to stderr."""
    from raytseg.batch.job import run_batch
    from raytseg.batch.progress import ProgressPrinter

    config = config_from_args(args)
    if not args.verbose:
        _quiet_ray()
    printer = ProgressPrinter(sys.stderr)
    report = run_batch(config, progress=None if args.quiet else printer.update, worker_logs=args.verbose)
    printer.close(report)
    if report.failures_exceeded:
        failed = report.count("failed")
        print(
            f"raytseg: {failed} item(s) failed, more than --max-failures {config.max_failures} allows.",
            file=sys.stderr,
        )
        return EXIT_TOO_MANY_FAILURES
    return 0


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``BatchConfig`` of a config file (if any) with the given flags on top."""
    from pydantic import ValidationError

    from raytseg.batch.config import BatchConfig, parse_max_failures

    not_options = ("config", "handler", "quiet", "verbose", "command")
    given = {k: v for k, v in vars(args).items() if k not in not_options}
    overrides: dict[str, Any] = {}
    if "roi_subset_robust" in given:
        overrides.update(roi_subset=given.pop("roi_subset_robust"), robust_crop=True)
    if "max_failures" in given:
        overrides["max_failures"] = parse_max_failures(given.pop("max_failures"))
    model = {}
    if "model_concurrency" in given:
        model["concurrency"] = tuple(given.pop("model_concurrency"))
    if "num_gpus" in given:
        model["num_gpus"] = given.pop("num_gpus")
    overrides.update(given)
    if model:
        overrides["model"] = model
    try:
        if args.config:
            return BatchConfig.from_file(args.config, overrides)
        if "input" not in overrides or "output" not in overrides:
            raise InvalidOptionError("batch needs --input and --output (or a --config file that sets them).")
        return BatchConfig.model_validate(overrides)
    except ValidationError as exc:
        raise InvalidOptionError(f"Invalid batch job options:\n{_validation_text(exc)}") from exc


def _quiet_ray() -> None:
    """Only Ray's errors on the console; the progress display says the rest."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, which is then quietened

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _validation_text(exc: Any) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m raytseg.batch``: the KubeRay RayJob entrypoint, the same as ``raytseg batch``."""
    from raytseg.cli import main as raytseg_main

    return raytseg_main(["batch", *(sys.argv[1:] if argv is None else argv)])
