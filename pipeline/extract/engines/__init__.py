"""How extraction's forward pass runs: ``local`` (one process, tf.data, ``engines.local``) or ``ray``
(Ray Data batch inference across the CPUs, GPUs and nodes of a cluster, ``engines.ray_data``).

Engines *produce*: each yields ``Batch``es of model outputs for positions in the list of images still
to do. Only ``pipeline.extract`` writes them, through the cache writer, so resume, the cache key and the
timing are one code path whatever ran the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

ENGINES = ("local", "ray")


@dataclass
class Batch:
    """Outputs for the readable images at ``positions`` (ascending); every item before ``end`` is done,
    so the positions in ``[previous end, end)`` missing from ``positions`` were unreadable."""

    positions: np.ndarray
    outputs: list[np.ndarray]  # [final embedding, tap 1, ...], one row per position
    end: int


def check(engine: str) -> None:
    """Refuse an unknown engine, or Ray when it is not installed, before any work."""
    if engine not in ENGINES:
        raise PipelineError(f"unknown --engine '{engine}' (known: {', '.join(ENGINES)})")
    if engine == "ray":
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise PipelineError(
                "--engine ray needs Ray Data: pip install -e '.[ray]' (or make setup EXTRAS=ray)"
            ) from None
