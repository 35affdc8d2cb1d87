"""Caches of one (dataset, backbone) made with other extraction settings sit side by side, one file each.

A variant is what the extraction settings make of the images: input size, taps and their grid, augmented
views, the precision computed in. Each has its own file, ``<backbone>@<tag>.h5`` (``efficientnet_lite0@112px``,
``efficientnet_lite0@112px-grid2``), so a later stage run with other defaults never replaces another
variant's cache (CLIP_benchmark keys its feature cache by preprocessing in the path for the same reason).
A cache from before variants (``<backbone>.h5``) is read as the variant its key says, where it is.

Which variant a stage uses (``pick``): the one the configuration describes, when it exists; otherwise the
one existing variant that agrees with every setting the configuration *names* (given in CONFIG or on the
command line, or set away from its default); several such is a one-line error listing them and the option
that picks one; none, a new variant (``extract``) or a one-line error (later stages).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.errors import PipelineError, first_line
from pipeline.extract.cache.key import read_key

log = logging.getLogger(__name__)

SETTINGS = ("input_size", "taps", "tap_grid", "views")  # what a user names; precision follows the device
OPTIONS = {"input_size": "--input-size", "taps": "--taps", "tap_grid": "--tap-grid", "views": "--views"}


def settings(key: dict) -> dict:
    """A cache key's extraction settings, in the configuration's terms."""
    taps = json.loads(key["taps"]) if key.get("taps") else {"taps": ["none"], "grid": 1}
    views = json.loads(key["views"]).get("views", 0) if key.get("views") else 0
    return {
        "input_size": int(key["input_size"]) if key.get("input_size") is not None else None,
        "taps": tuple(taps["taps"]),
        "tap_grid": int(taps.get("grid", 1)),
        "views": int(views),
        "precision": str(key.get("precision", "")),
    }


def tag(key: dict) -> str:
    """``112px``, ``112px-grid2``, ``224px-notaps``, ``112px-views1``, ``112px-taps3f2a1c`` (named taps),
    ``-mixed_float16`` when not computed in float32."""
    return _tag(settings(key))


def _tag(s: dict) -> str:
    parts = [f"{s['input_size'] or 'any'}px"]  # every setting of SETTINGS (and precision) appears, or is at its default
    if s["taps"] == ("none",):
        parts.append("notaps")
    elif s["taps"] != ("stages",):
        parts.append("taps" + hashlib.sha1(",".join(s["taps"]).encode()).hexdigest()[:6])
    if s["tap_grid"] != 1 and s["taps"] != ("none",):
        parts.append(f"grid{s['tap_grid']}")
    if s["views"]:
        parts.append(f"views{s['views']}")
    if s.get("precision") and not s["precision"].startswith("float32"):
        parts.append(s["precision"].split()[0])
    return "-".join(parts)


def variant_path(folder: Path, backbone: str, key: dict) -> Path:
    return Path(folder) / f"{backbone}@{tag(key)}.h5"


def select(folder: Path, backbone: str, want: dict, named: set[str]) -> Path:
    """The cache a later stage reads: ``pick`` among the complete ones, or a one-line error saying what to run."""
    found = existing(folder, backbone)
    chosen = pick(want, named, found)
    if chosen is not None:
        return chosen.path
    if found:
        raise PipelineError(
            f"no cache of {backbone} has these extraction settings ({want['input_size']} px, taps "
            f"{' '.join(want['taps'])}, grid {want['tap_grid']}, views {want['views']}); there are: "
            f"{'; '.join(v.describe() for v in found)}: run `make extract` with the same settings, or name one"
        )
    return Path(folder) / f"{backbone}@{_tag(want)}.h5"  # none yet: where extract writes it (the reader says so)


@dataclass
class Variant:
    path: Path
    key: dict

    @property
    def tag(self) -> str:
        return tag(self.key)

    def describe(self) -> str:
        s = settings(self.key)
        taps = "no taps" if s["taps"] == ("none",) else f"taps {' '.join(s['taps'])}, grid {s['tap_grid']}"
        views = f", {s['views']} views" if s["views"] else ""
        return f"{self.path.name} ({s['input_size']} px, {taps}{views})"


def existing(folder: Path, backbone: str) -> list[Variant]:
    """The complete caches of ``backbone`` in ``folder``: its variants and a cache from before them."""
    out = []
    for path in sorted(Path(folder).glob(f"{backbone}*.h5")):
        if path.stem != backbone and not path.stem.startswith(f"{backbone}@"):
            continue
        try:
            with h5py.File(path, "r") as f:
                if not f.attrs.get("complete"):
                    continue
                key = read_key(f.attrs)
        except (OSError, KeyError) as e:
            log.warning("warning: %s is unreadable (%s); not a variant to choose from", path.name, first_line(e))
            continue
        out.append(Variant(path, key))
    return out


_FIELDS = {  # setting: (section, field) of the configuration
    "input_size": ("backbone", "input_size"),
    "taps": ("extract", "taps"),
    "tap_grid": ("extract", "tap_grid"),
    "views": ("extract", "views"),
}


def request(backbone_cfg, extract_cfg, explicit: tuple[str, ...], native_size: int | None) -> tuple[dict, set[str]]:
    """(the settings the configuration describes, the ones it names): named = given in CONFIG or on the
    command line (``explicit``), or away from its default (a Config built in code). ``native_size``: the
    backbone's own input size (None: not known here, as for a cache imported from elsewhere)."""
    size = backbone_cfg.input_size or native_size
    want = {
        "input_size": int(size) if size else None,
        "taps": tuple(extract_cfg.taps),
        "tap_grid": int(extract_cfg.tap_grid) if tuple(extract_cfg.taps) != ("none",) else 1,
        "views": int(extract_cfg.views),
    }
    defaults = {"backbone": type(backbone_cfg)(), "extract": type(extract_cfg)()}
    sections = {"backbone": backbone_cfg, "extract": extract_cfg}
    named = {
        s
        for s, (sec, name) in _FIELDS.items()
        if f"{sec}.{name}" in explicit or getattr(sections[sec], name) != getattr(defaults[sec], name)
    }
    return want, named


def pick(want: dict, named: set[str], found: list[Variant]) -> Variant | None:
    """The variant a stage uses (see the module docstring); None: none exists that agrees. ``want``: the
    settings the configuration describes (``request``)."""
    fields = SETTINGS + (("precision",) if "precision" in want else ())  # extract keys it; readers need not
    exact = [v for v in found if all(settings(v.key)[s] == want[s] for s in fields)]
    if exact:
        return min(exact, key=lambda v: "@" not in v.path.stem)  # a variant file before an older plain one
    agree = [v for v in found if all(settings(v.key)[s] == want[s] for s in named)]
    if len(agree) == 1:
        log.info(
            "using the cache %s: the only one that agrees with the settings named here (%s for another)",
            agree[0].describe(),
            " / ".join(OPTIONS[s] for s in SETTINGS if s not in named) or "other settings",
        )
        return agree[0]
    if len(agree) > 1:
        free = [OPTIONS[s] for s in SETTINGS if s not in named]
        raise PipelineError(
            f"{len(agree)} cache variants fit these settings: {'; '.join(v.describe() for v in agree)}; "
            f"pick one with {' / '.join(free)} (on the command line or in CONFIG)"
        )
    return None
