"""``raytseg`` command line: TotalSegmentator's flags, spelled the same, on raytseg's pipeline.

    raytseg segment -i ct.nii.gz -o segmentations [--fast] [-ta TASK] [--ml] ...
    raytseg stats -i ct.nii.gz --seg seg.nii.gz -o statistics.json
    raytseg get-modality -i image.nii.gz -o modality.json [-n]
    raytseg get-phase -i ct.nii.gz -o phase.json
    raytseg combine-masks -i segmentations -o lung.nii.gz -m lung
    raytseg tasks [--json] [--classes TASK]
    raytseg weights download|import|synth ...
    raytseg set-license -l aca_XXXXXXXXXXXXXX
    raytseg serve [--config serve.yaml]          (HTTP service on a local Ray)
    raytseg batch --input URI --output URI ...   (Ray Data job)

The CLI only parses arguments, sets process-wide knobs (logging, torch threads) and
calls library functions; user errors print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytseg.batch import cli as batch_cli
from raytseg.config import DEVICES
from raytseg.errors import InvalidOptionError, RaytsegError
from raytseg.options import add_backend_flag, add_flags, from_args
from raytseg.serve import cli as serve_cli

if TYPE_CHECKING:
    from raytseg.pipeline.run import LocalRequest

log = logging.getLogger("raytseg")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        result: int = args.handler(args)
    except RaytsegError as exc:
        if getattr(args, "debug", False):  # TotalSegmentator's --debug: where it failed, in full
            log.exception(
                "Failed on input %s, task %s", getattr(args, "input", None), getattr(args, "task", None)
            )
        print(f"raytseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raytseg: interrupted", file=sys.stderr)
        return 130
    return result


def _configure_logging(*, quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("raytseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytseg", description="TotalSegmentator-compatible segmentation, scalable on Ray."
    )
    parser.add_argument("--version", action="version", version=f"raytseg {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_stats(sub)
    _add_get_modality(sub)
    _add_get_phase(sub)
    _add_combine(sub)
    _add_tasks(sub)
    _add_weights(sub)
    serve_cli.register(sub)
    batch_cli.register(sub)
    lic = sub.add_parser("set-license", help="Store a TotalSegmentator license key (licensed tasks).")
    lic.add_argument("-l", "--license_number", required=True)
    lic.add_argument("--validate", action="store_true", help="Also check the key with the license server.")
    lic.set_defaults(handler=_cmd_set_license)
    return parser


def _add_segment(sub: Any) -> None:
    p = sub.add_parser("segment", help="Segment a CT/MR image (TotalSegmentator's flags).")
    p.add_argument("-i", dest="input", required=True, help="NIfTI file, DICOM folder/zip, or fsspec URI.")
    p.add_argument(
        "-o", dest="output", help="Output folder (or .nii.gz file with --ml); optional with --dicomweb_store."
    )
    add_flags(p)
    _device_flags(p)
    p.add_argument("-l", "--license_number", help="Store this license key first (licensed tasks).")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress output.")
    p.add_argument("-v", "--verbose", action="store_true", help="More progress output.")
    p.add_argument("-rp", "--report", help="Also write TotalSegmentator's run report (JSON) to this file.")
    p.add_argument(
        "--debug", action="store_true", help="On errors, also print the input, task and traceback."
    )
    p.add_argument("-t", "--nora_tag", default="None", help="TotalSegmentator's NORA tag: not supported.")
    p.add_argument(
        "-cp",
        "--crop_path",
        help="Accepted, no effect (as in TotalSegmentator 2.18): crop masks come from the crop model.",
    )
    p.add_argument(
        "--test", type=int, choices=[0, 1, 3], default=0, help="TotalSegmentator's test hook: not supported."
    )
    p.add_argument("-lt", "--list-tasks", action=_ListAndExit, nargs=0, help="List the tasks and exit.")
    p.add_argument(
        "-lc", "--list-classes", action=_ListAndExit, nargs="?", const="total", metavar="TASK",
        help="List the classes of TASK (default total) and exit.",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"raytseg {_version()}")
    p.set_defaults(handler=_cmd_segment)


class _ListAndExit(argparse.Action):
    """TotalSegmentator's -lt and -lc: ``raytseg tasks`` output, then exit, like --help."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        classes = values if self.dest == "list_classes" else None
        try:
            status = _cmd_tasks(argparse.Namespace(json=False, classes=classes))
        except RaytsegError as exc:
            parser.exit(1, f"raytseg: error: {exc}\n")
        parser.exit(status)


def _add_stats(sub: Any) -> None:
    p = sub.add_parser("stats", help="TotalSegmentator statistics for an existing segmentation.")
    p.add_argument("-i", dest="input", required=True, help="The image the masks belong to.")
    p.add_argument("--seg", required=True, help="Multilabel NIfTI (or a folder of per-class masks).")
    p.add_argument("-o", dest="output", help="statistics.json to write.")
    p.add_argument(
        "-r",
        "--radiomics",
        metavar="FILE",
        help="Write TotalSegmentator's radiomics features of each class (statistics_radiomics.json) to FILE.",
    )
    p.add_argument("-ta", "--task", default="total", help="Class map when the file has no label table.")
    p.add_argument("-sii", "--stats_include_incomplete", action="store_true")
    p.add_argument("-sa", "--stats_aggregation", choices=["mean", "median"], default="mean")
    p.add_argument("-sx", "--statistics_extra", action="store_true", help="Also voxels, std, min, max, bbox.")
    p.set_defaults(handler=_cmd_stats)


def _add_get_modality(sub: Any) -> None:
    p = sub.add_parser("get-modality", help="CT or MR? (totalseg_get_modality's classifiers).")
    _classifier_flags(p, "NIfTI file, DICOM folder/zip, or URI.")
    p.add_argument(
        "-n",
        dest="normalized_intensities",
        action="store_true",
        help="Classify normalised intensities of 16 structures (runs total_mr --fast).",
    )
    p.set_defaults(handler=_cmd_get_modality)


def _add_get_phase(sub: Any) -> None:
    p = sub.add_parser("get-phase", help="CT contrast phase (totalseg_get_phase's classifiers).")
    _classifier_flags(p, "CT: NIfTI file, DICOM folder/zip, or URI.")
    p.add_argument(
        "-s", dest="existing_stats", help="Reuse this statistics.json (total --fast -sa median -sii)."
    )
    p.set_defaults(handler=_cmd_get_phase)


def _device_flags(p: argparse.ArgumentParser) -> None:
    """Where the networks run, and what runs them."""
    p.add_argument("-d", "--device", default="gpu", help=f"{DEVICES} (default: gpu, else cpu).")
    add_backend_flag(p)


def _classifier_flags(p: argparse.ArgumentParser, input_help: str) -> None:
    """The flags TotalSegmentator's classifier tools share."""
    p.add_argument("-i", dest="input", required=True, help=input_help)
    p.add_argument("-o", dest="output", required=True, help="JSON file to write.")
    _device_flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="Print nothing.")


def _cmd_get_modality(args: argparse.Namespace) -> int:
    from raytseg.pipeline.modality import modality_of

    volume, segmenter = _classifier_inputs(args)
    guess = modality_of(volume, segmenter.segment if args.normalized_intensities else None)
    return _write_answer(args, guess.to_json())


def _cmd_get_phase(args: argparse.Namespace) -> int:
    from raytseg import storage
    from raytseg.pipeline.phase import phase_of

    volume, segmenter = _classifier_inputs(args)
    stats = None if args.existing_stats is None else json.loads(storage.read_bytes(args.existing_stats))
    return _write_answer(args, phase_of(volume, segmenter.segment, stats).to_json())


def _classifier_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The loaded image and a segmenter (which loads models only when it segments)."""
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.run import default_segmenter

    settings = _settings()
    segmenter = default_segmenter(args.device, settings, args.backend)
    return load_volume(args.input, LoadLimits.from_settings(settings)), segmenter


def _write_answer(args: argparse.Namespace, answer: bytes) -> int:
    from raytseg import storage

    storage.write_bytes(args.output, answer)
    if not args.quiet:
        print(answer.decode())
    return 0


def _add_combine(sub: Any) -> None:
    p = sub.add_parser("combine-masks", help="Combine class masks into one (totalseg_combine_masks).")
    p.add_argument("-i", dest="source", required=True, help="Output folder or multilabel file.")
    p.add_argument("-o", dest="output", required=True)
    p.add_argument("-m", "--masks", required=True, help="lung, lung_left, lung_right, vertebrae, ribs, ...")
    p.add_argument("-ml", "--multilabel", action="store_true", help="Add a label table to the output.")
    p.set_defaults(handler=_cmd_combine)


def _add_tasks(sub: Any) -> None:
    p = sub.add_parser("tasks", help="List tasks and their classes.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.add_argument("--classes", metavar="TASK", help="List the classes of one task.")
    p.set_defaults(handler=_cmd_tasks)


def _add_weights(sub: Any) -> None:
    p = sub.add_parser("weights", help="Download, import or synthesize model weights.")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    dl = wsub.add_parser("download", help="Download a task's models (TotalSegmentator's release URLs).")
    dl.add_argument("-t", "--task", required=True)
    _mode_flags(dl)
    dl.set_defaults(handler=_cmd_weights_download)
    imp = wsub.add_parser(
        "import",
        help="Import a weights zip (totalseg_import_weights), or the classifier and SNOMED files "
        "of a TotalSegmentator wheel (.whl) or of a folder holding its package.",
    )
    imp.add_argument("zip", type=Path, metavar="ZIP|WHEEL|FOLDER")
    imp.set_defaults(handler=_cmd_weights_import)
    syn = wsub.add_parser("synth", help="Write random-weight model folders (tests, benchmarks only).")
    syn.add_argument("-t", "--task", required=True)
    _mode_flags(syn)
    syn.add_argument("--tiny", action="store_true", help="Very small networks (fast tests).")
    syn.add_argument(
        "-ms", "--model_size", choices=("big", "small"), default="big", help="small: -ms small's plans."
    )
    syn.add_argument("-o", dest="output", required=True, type=Path, help="Weights folder to write into.")
    syn.set_defaults(handler=_cmd_weights_synth)


def _mode_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fast", action="store_true")
    group.add_argument("--fastest", action="store_true")


def _version() -> str:
    from raytseg import __version__

    return __version__


def _settings() -> Any:
    from raytseg.config import Settings

    return Settings.from_env()


def _cmd_segment(args: argparse.Namespace) -> int:
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.model import configure_torch
    from raytseg.pipeline.run import default_segmenter, run_local

    started = time.perf_counter()
    settings = _settings()
    request = _segment_request(args, settings)
    segmenter = default_segmenter(args.device, settings, args.backend)
    volume = load_volume(args.input, LoadLimits.from_settings(settings))
    log.info("Loaded %s: shape %s, voxel size %s mm", volume.source, volume.shape, volume.zooms)
    configure_torch(segmenter.device, cudnn_autotune=settings.cudnn_autotune)
    seg, written = run_local(segmenter, volume, request, started)
    where = args.output or request.output.dicomweb_store
    log.info("Wrote %d output(s) to %s in %.1f s", len(written), where, seg.timings.get("total", 0.0))
    return 0


def _segment_request(args: argparse.Namespace, settings: Any) -> LocalRequest:
    """The request, after the license key is stored and before anything is read."""
    from raytseg.pipeline.export import check_target
    from raytseg.pipeline.records import STATISTICS_NAME
    from raytseg.pipeline.run import LocalRequest

    if args.license_number:
        from raytseg.weights.license import set_license

        set_license(args.license_number, settings)
    _refuse_unsupported(args)
    options, output, places = from_args(args)
    check_target(args.output, output, options.statistics and STATISTICS_NAME not in places)
    return LocalRequest(args.input, args.output, options, output, places, args.report or None)


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """TotalSegmentator flags whose meaning lies outside raytseg, refused rather than ignored."""
    if args.nora_tag != "None":
        raise InvalidOptionError(
            "-t/--nora_tag runs the NORA platform's own command to tag the output, which raytseg "
            "does not call: tag the written files with NORA afterwards."
        )
    if args.test:
        raise InvalidOptionError(
            "--test replaces the prediction with files from TotalSegmentator's source tree (its unit "
            "tests); raytseg's tests use synthetic weights instead (raytseg weights synth)."
        )


def _cmd_stats(args: argparse.Namespace) -> int:
    from raytseg import storage
    from raytseg.pipeline.load import LoadLimits, load_volume
    from raytseg.pipeline.stats import basic_statistics, read_segmentation_labels, statistics_json

    if args.output is None and args.radiomics is None:
        raise InvalidOptionError("Give -o statistics.json, --radiomics statistics_radiomics.json, or both.")
    settings = _settings()
    image = load_volume(args.input, LoadLimits.from_settings(settings))
    labels, classes = read_segmentation_labels(args.seg, args.task, image.shape)
    if args.output is not None:
        stats = basic_statistics(
            labels,
            image.data,
            image.zooms,
            classes,
            include_incomplete=args.stats_include_incomplete,
            aggregation=args.stats_aggregation,
            extra=args.statistics_extra,
        )
        storage.write_bytes(args.output, statistics_json(stats))
    if args.radiomics is not None:
        from raytseg.pipeline.export import label_mask_files
        from raytseg.pipeline.radiomics import radiomics_json

        storage.write_bytes(args.radiomics, radiomics_json(image, label_mask_files(labels, classes, image)))
    return 0


def _cmd_combine(args: argparse.Namespace) -> int:
    from raytseg import storage
    from raytseg.masks import combine_masks
    from raytseg.pipeline.export import nifti_gz_bytes

    img = combine_masks(args.source, args.masks, multilabel=args.multilabel)
    gz = str(args.output).endswith(".gz")
    storage.write_bytes(args.output, nifti_gz_bytes(img) if gz else img.to_bytes())
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from raytseg.tasks import get_task, load_catalog

    if args.classes:
        task = get_task(args.classes)
        if args.json:
            print(json.dumps({str(k): v for k, v in task.classes.items()}, indent=2))
        else:
            print(f"Task {task.name!r} [{task.modality}, {len(task.classes)} classes]")
            for idx, name in task.classes.items():
                print(f"{idx:>4}  {name}")
        return 0
    tasks = load_catalog().tasks
    if args.json:
        out = {
            name: {
                "modality": t.modality,
                "license_required": t.license_required,
                "modes": sorted(t.modes),
                "classes": {str(k): v for k, v in t.classes.items()},
            }
            for name, t in tasks.items()
        }
        print(json.dumps(out, indent=2))
        return 0
    width = max(map(len, tasks))
    print(f"{'TASK'.ljust(width)}  MODALITY  LICENSE  CLASSES  MODES")
    for name, t in tasks.items():
        lic = "yes" if t.license_required else "no"
        modes = ",".join(sorted(t.modes))
        print(f"{name.ljust(width)}  {t.modality:<8}  {lic:<7}  {len(t.classes):>7}  {modes}")
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from raytseg.weights.fetch import download_task
    from raytseg.weights.license import read_license

    settings = _settings()
    paths = download_task(
        args.task, settings, fast=args.fast, fastest=args.fastest, license_key=read_license(settings)
    )
    for path in paths:
        print(path)
    return 0


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from raytseg.resources import import_resources, is_package_source
    from raytseg.weights.fetch import import_zip

    settings = _settings()
    if is_package_source(args.zip):
        written = import_resources(args.zip, settings.weights_dir)
    else:
        written = import_zip(args.zip, settings.weights_dir, settings)
    for path in written:
        print(path)
    return 0


def _cmd_weights_synth(args: argparse.Namespace) -> int:
    from raytseg.weights.synth import synthesize_task

    small = args.model_size == "small"
    paths = synthesize_task(
        args.task, args.output, fast=args.fast, fastest=args.fastest, tiny=args.tiny, small=small
    )
    for path in paths:
        print(path)
    print(
        "These weights are random: their output is meaningless and only for tests and benchmarks.",
        file=sys.stderr,
    )
    return 0


def _cmd_set_license(args: argparse.Namespace) -> int:
    from raytseg.weights.license import set_license

    set_license(args.license_number, _settings(), validate_online=args.validate)
    print("License stored.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
