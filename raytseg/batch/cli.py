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
from typing import TYPE_CHECKING, Any

from raytseg.config import DEVICES
from raytseg.errors import InvalidOptionError
from raytseg.options import add_backend_flag, add_flags, given_options
from raytseg.pipeline.tools import TOOLS

if TYPE_CHECKING:
    from raytseg.batch.config import BatchConfig

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
    add_flags(p, overrides_config=True)
    p.add_argument("-d", "--device", default=_SUPPRESS, help=f"{DEVICES} (default: gpu, else cpu).")
    add_backend_flag(p, _SUPPRESS)
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
    p.add_argument(
        "--tool", choices=TOOLS, default=_SUPPRESS,
        help="A classifier tool instead of a segmentation: each item's folder gets its JSON file.",
    )  # fmt: skip
    p.add_argument(
        "-n", "--normalized_intensities", action="store_true", default=_SUPPRESS,
        help="With --tool get-modality: the ROI-based classifier (segments with total_mr fast).",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="Only the summary and failures.")
    p.add_argument("-v", "--verbose", action="store_true", help="More output, worker logs included.")


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


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    """The ``BatchConfig`` of a config file (if any) with the given flags on top."""
    from raytseg.batch.config import BatchConfig, parse_max_failures

    not_options = {"config", "handler", "quiet", "verbose", "command", "roi_subset_robust"}
    overrides = {k: v for k, v in vars(args).items() if k not in not_options}
    overrides.update(given_options(args))
    if "max_failures" in overrides:
        overrides["max_failures"] = parse_max_failures(overrides["max_failures"])
    model = {}
    if "model_concurrency" in overrides:
        model["concurrency"] = tuple(overrides.pop("model_concurrency"))
    if "num_gpus" in overrides:
        model["num_gpus"] = overrides.pop("num_gpus")
    if model:
        overrides["model"] = model
    tool = {}
    if "tool" in overrides:
        tool["name"] = overrides.pop("tool")
    if "normalized_intensities" in overrides:
        tool["normalized_intensities"] = overrides.pop("normalized_intensities")
    if tool:
        overrides["tool"] = tool
    if not args.config and not {"input", "output"} <= overrides.keys():
        raise InvalidOptionError("batch needs --input and --output (or a --config file that sets them).")
    return BatchConfig.load(args.config, overrides)


def _quiet_ray() -> None:
    """Only Ray's errors on the console; the progress display says the rest."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, which is then quietened

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
