"""Every entry point's options, derived from the records that declare them.

``SegmentOptions`` (what to segment) and ``OutputOptions`` (which files) are the only
declarations of an option: their fields give the flags of ``raytseg segment`` and
``raytseg batch`` (with TotalSegmentator's short aliases, from each field's ``Flag``)
and the HTTP API's query parameters and JSON fields. Adding a field to either record is
the whole change; ``tests/unit/test_options.py`` adds one and finds it everywhere.
"""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from raytseg.config import BACKENDS
from raytseg.configfile import validated
from raytseg.errors import InvalidOptionError
from raytseg.pipeline.records import Flag, OutputOptions, SegmentOptions

Record = TypeVar("Record", bound=BaseModel)

RECORDS: tuple[type[BaseModel], ...] = (SegmentOptions, OutputOptions)

# TotalSegmentator's one shorthand flag: --roi_subset_robust A B is --roi_subset A B --robust_crop.
ROBUST_SUBSET = ("-rsr", "--roi_subset_robust")


def declared(record: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, Flag]]:
    """The fields of ``record`` that are options, with their command-line spelling."""
    for name, info in record.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is not None:
            yield name, info, flag


def option_names() -> set[str]:
    """Every option's name, across the records."""
    return {name for record in RECORDS for name, _, _ in declared(record)}


# --- command line ----------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, *, overrides_config: bool = False) -> None:
    """Add every option's flag to ``parser``.

    ``overrides_config``: the flags sit on top of a config file (``raytseg batch``), so
    a flag the user did not give leaves no value at all instead of the default.
    """
    for record in RECORDS:
        for name, info, flag in declared(record):
            default = argparse.SUPPRESS if overrides_config else info.default
            parser.add_argument(*_spelling(name, flag), **_argument(name, info, flag), default=default)
    robust = "--roi_subset, cropping with the 3 mm model."
    parser.add_argument(*ROBUST_SUBSET, nargs="+", default=argparse.SUPPRESS, help=robust)


def add_backend_flag(parser: argparse.ArgumentParser, default: Any = "auto") -> None:
    """``--backend``: what runs the networks (``raytseg.pipeline.backends``)."""
    parser.add_argument(
        "--backend",
        default=default,
        choices=BACKENDS,
        help="What runs the networks: torch, openvino (CPU only, faster, not bit-identical), or auto "
        "(the fastest one that keeps TotalSegmentator's masks; today torch).",
    )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The option values present in ``args`` (all of them, or the given ones for batch)."""
    names = option_names()
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    robust = getattr(args, "roi_subset_robust", None)
    if robust:
        values.update(roi_subset=tuple(robust), robust_crop=True)
    return values


def from_args(args: argparse.Namespace) -> tuple[SegmentOptions, OutputOptions, dict[str, str]]:
    """The records of ``raytseg segment``'s arguments and the files placed elsewhere than the
    output folder (``placed_files``); invalid values raise ``InvalidOptionError``."""
    values, places = placed_files(given_options(args))
    options, output = split_options(values)
    return options, output, places


def split_options(values: Mapping[str, Any]) -> tuple[SegmentOptions, OutputOptions]:
    """Both records from one mapping of option names (the Python API's keyword arguments),
    refused before any image is read when they ask for what they cannot give together."""
    unknown = sorted(set(values) - option_names())
    if unknown:
        raise InvalidOptionError(f"Unknown option(s) {', '.join(unknown)}: see raytseg segment --help.")
    from raytseg.pipeline.export import check_model_grid

    refuse_placed(values)
    options, output = record_of(SegmentOptions, values), record_of(OutputOptions, values)
    check_model_grid(options, output)
    return options, output


def placed_files(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """TotalSegmentator's ``-s PATH``: an option whose flag writes a file, given a path instead
    of true, is on and writes its file at that path instead of into the output folder.

    Returns ``values`` with ``True`` for each such path, and ``{file name: path}``.
    """
    given, places = dict(values), dict[str, str]()
    for name, flag in _file_flags():
        value = given.get(name)
        if isinstance(value, (str, os.PathLike)):
            given[name], places[str(flag.file)] = True, os.fspath(value)
            if flag.beside is not None:  # TotalSegmentator's Path.with_suffix
                suffix = os.path.splitext(flag.beside)[1]
                places[flag.beside] = os.path.splitext(os.fspath(value))[0] + suffix
    return given, places


def refuse_placed(values: Mapping[str, Any]) -> None:
    """Refuse a path where only true or false can be honoured: the service and batch write
    every file beside an image's other outputs, in locations of their own."""
    for name, flag in _file_flags():
        if _is_path(values.get(name)):
            raise InvalidOptionError(
                f"{name} takes true or false here, not a path: a path (TotalSegmentator's -s PATH) "
                f"places {flag.file} for raytseg segment and the Python API only; the service and "
                "batch write it beside each image's other outputs."
            )


def _is_path(value: Any) -> bool:
    """A path, not one of pydantic's spellings of a bool ("true", "no", "1") in a config file."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    try:
        TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return True
    return False


def _file_flags() -> Iterator[tuple[str, Flag]]:
    """``(option, flag)`` of the options whose flag writes a file a path may place."""
    for record in RECORDS:
        for name, _, flag in declared(record):
            if flag.file is not None:
                yield name, flag


def record_of(record: type[Record], values: Mapping[str, Any]) -> Record:
    """``record`` from the matching entries of ``values``; errors name the option."""
    return validated(record, {k: v for k, v in values.items() if k in record.model_fields}, "options")


def _spelling(name: str, flag: Flag) -> tuple[str, ...]:
    spellings = (flag.short, f"--{flag.negated or name}", flag.alias)
    return tuple(spelling for spelling in spellings if spelling is not None)


def _argument(name: str, info: FieldInfo, flag: Flag) -> dict[str, Any]:
    kind = _base(info.annotation)
    argument: dict[str, Any] = {"dest": name, "help": info.description}
    if kind is bool and flag.file is not None:  # -s, or -s PATH: the file at PATH
        argument.update(nargs="?", const=True, metavar="PATH")
        argument["help"] = f"{info.description} With PATH: write {flag.file} there instead."
    elif kind is bool:
        argument["action"] = "store_false" if flag.negated else "store_true"
        if flag.negated:
            argument["help"] = f"No {info.description}"  # the option is on by default
    elif get_origin(kind) is tuple:
        argument["nargs"] = "+"
    elif get_origin(kind) is Literal:
        argument["choices"] = list(get_args(kind))
    else:
        argument["type"] = kind
        if flag.const is not None:
            argument.update(nargs="?", const=flag.const)
    return argument


def _base(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


# --- HTTP ------------------------------------------------------------------------------


class HttpOptions(BaseModel):
    """Base of the HTTP option models; ``segment`` and ``output`` give the records."""

    model_config = ConfigDict(extra="forbid")  # a typo (fsat=true) is an error, not a slow request

    @property
    def task_name(self) -> str:
        """The requested task (a job's request gives it beside its options)."""
        return str(self.__dict__.get("task", SegmentOptions.model_fields["task"].default))

    def segment(self, **values: Any) -> SegmentOptions:
        rois = getattr(self, "roi_subset", None)
        if rois is not None:  # ?roi_subset=a,b and ?roi_subset=a&roi_subset=b both work
            rois = tuple(n.strip() for item in rois for n in item.split(",") if n.strip())
        return record_of(SegmentOptions, {**self.model_dump(), "roi_subset": rois, **values})

    def output(self) -> OutputOptions:
        given = {k: v for k, v in self.model_dump().items() if v is not None}  # None: not given
        return record_of(OutputOptions, given)


def http_model(name: str, *, exclude: frozenset[str] = frozenset(), ml: bool = True) -> type[HttpOptions]:
    """A strict pydantic model of every option, for a query string or a JSON body.

    Lists arrive as repeated parameters (``list[str]``). ``ml`` is the default of the
    multilabel option: an HTTP answer is one NIfTI unless asked otherwise.
    """
    fields: dict[str, Any] = {}
    for record in RECORDS:
        for field, info, _ in declared(record):
            if field in exclude:
                continue
            kind = _base(info.annotation)
            if get_origin(kind) is tuple:
                info = FieldInfo.merge_field_infos(
                    info,
                    default=None,  # not given: the record's default
                    description=f"{info.description} Repeat the parameter or separate with commas.",
                )
                fields[field] = (list[str] | None, info)
            else:
                fields[field] = (info.annotation, info)
    fields["ml"] = (bool, FieldInfo.merge_field_infos(OutputOptions.model_fields["ml"], default=ml))
    model: type[HttpOptions] = create_model(name, __base__=HttpOptions, **fields)
    return model
