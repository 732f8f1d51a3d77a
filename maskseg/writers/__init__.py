"""Writers: the Writer protocol and the ``maskseg.writers`` entry-point registry.

Built-in and third-party writers are found the same way, through the entry-point group
``maskseg.writers``; a writer's module is imported only when its name is asked for, and one that
fails to load is reported by name instead of crashing a listing.
"""

from .base import BaseWriter, ImageRecord, RunContext, Writer
from .registry import GROUP, available_writers, load_writers

__all__ = ["GROUP", "BaseWriter", "ImageRecord", "RunContext", "Writer", "available_writers", "load_writers"]
