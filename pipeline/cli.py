"""`python -m pipeline <stage>`: one subcommand per stage, flags generated from the config."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import traceback
import types
import typing
from pathlib import Path

from pipeline.api import STAGES, TRAINING, run_stage
from pipeline.config import flags, resolve_config, section_types
from pipeline.errors import DISK_FULL, PipelineError


def _list_backbones(args) -> None:
    from pipeline import backbones

    if args.taps:
        from pipeline.backbones import taps

        spec = backbones.get(args.taps)
        size = args.input_size or spec.input_size
        base = spec.build(None, size)  # the graph only: no weights needed to list layers
        print(f"{spec.name} at {size}px: layers that can be tapped (* = default 'stages' taps)")
        for layer, shape, default in taps.describe(base):
            print(f"{'*' if default else ' '} {layer:40s} {shape}")
        return
    for name, spec in sorted(backbones.REGISTRY.items()):
        print(f"{name:24s} {spec.input_size:4d}px  {spec.family:6s} {spec.preprocessing}")


def _base_type(tp):
    """Strip ``Optional`` so argparse gets the callable that parses the value."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, sections: list[str]) -> None:
    """Add one flag per field of the named sections (plus --artifacts and --config)."""
    parser.add_argument("--config", metavar="TOML", help="TOML file with [section] tables overriding defaults")
    help_ = "folder for every artifact the pipeline writes (default: artifacts)"
    parser.add_argument("--artifacts", default=None, metavar="DIR", help=help_)
    types_ = section_types()
    named = flags(sections, set(parser._option_string_actions))  # two sections share a name: the later qualified
    for section in sections:
        cls = types_[section]
        group = parser.add_argument_group(f"{section} options")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = named[section, f.name]
            tp = _base_type(hints[f.name])
            help_ = f.metadata["help"]
            if f.default is not None and "default" not in help_:
                help_ += f" (default: {f.default})"
            dest = f"{section}.{f.name}"
            meta = f.name.upper()
            if tp is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
            elif typing.get_origin(tp) in (tuple, list):
                inner = typing.get_args(tp)[0]
                group.add_argument(flag, dest=dest, type=inner, nargs="+", default=None, metavar=meta, help=help_)
            else:
                choices, metavar = f.metadata.get("choices"), None if f.metadata.get("choices") else meta
                kw = dict(dest=dest, type=tp, default=None, metavar=metavar, choices=choices, help=help_)
                group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Frozen CNN features + classical heads vs. a fine-tuned baseline: accuracy and training time.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_, sections, _target) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        add_config_arguments(p, sections)
        if name in TRAINING or name == "extract":
            what = "re-extract the selected cache" if name == "extract" else "redo results"
            help_ = f"{what} even when its inputs match a saved one (default: reuse it; replaced once complete)"
            p.add_argument("--force", action="store_true", help=help_)
    bb = sub.add_parser("backbones", help="list the registered backbones", description="list the registered backbones")
    bb.add_argument("--taps", metavar="BACKBONE", help="list BACKBONE's layers that extract --taps can pool")
    bb.add_argument("--input-size", type=int, default=None, help="input side for --taps (default: native)")
    return parser


def _setup_logging(debug: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if debug else "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` runs: temporary files are removed, the cache's
    partial file is closed with every batch it holds written, nothing half-written is left in place."""


def _terminate(signum, frame):
    raise Terminated


def disk_full_message(e: OSError) -> str:
    """One line for a full disk (or a file-size limit): where, how much is free, and that nothing is lost."""
    where = Path(e.filename) if e.filename else Path.cwd()
    folder = next((p for p in (where, *where.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(folder).free
    return (
        f"no space left writing {e.filename or 'a file'} ({os.strerror(e.errno)}; {free / 2**20:,.0f} MiB free on "
        f"the disk of {folder}): nothing already written was replaced; free space and rerun the same command"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.stage == "backbones":
            _list_backbones(args)
            return 0
        run_stage(args.stage, resolve_config(args))
        return 0
    except (PipelineError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        if isinstance(e, PipelineError):
            msg = str(e)
        elif e.errno in DISK_FULL:
            msg = disk_full_message(e)
        else:
            msg = f"{type(e).__name__}: {e}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}; nothing half-written was kept: rerun the same command to continue", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
