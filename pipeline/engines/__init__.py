"""How extraction's forward pass runs: ``local`` (one process, tf.data, in ``pipeline.extract``) or
``ray`` (Ray Data batch inference across the CPUs, GPUs and nodes of a cluster, ``ray_data``).
Either way the driver writes the rows into the same HDF5 cache, so resume and the cache key are shared."""

from __future__ import annotations

from pipeline.errors import PipelineError

ENGINES = ("local", "ray")


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
