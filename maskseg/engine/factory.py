"""``make_engine``: the engine a run's config names (the ray one imported only when asked for)."""

from __future__ import annotations

from ..config import PredictConfig
from ..errors import UsageError
from .base import Engine
from .local import LocalEngine


def make_engine(config: PredictConfig) -> Engine:
    """The engine ``config.engine.name`` names."""
    name = config.engine.name
    if name == "local":
        return LocalEngine(config)
    if name == "ray":
        if config.tile.size is not None:
            raise UsageError("--tile runs with --engine local only (the ray engine sends whole images to its workers)")
        if config.tiff_pages:
            raise UsageError("--tiff-pages runs with --engine local only (the ray engine decodes one image a file)")
        from .ray import RayEngine

        return RayEngine(config)
    raise UsageError(f"--engine {name}: expected local or ray")
