"""`maskseg writers` and `maskseg models`: what a plugin or option value may name."""

from __future__ import annotations

import typer


def list_writers() -> None:
    """List the installed writers (built-in and third-party, from the maskseg.writers entry points)."""
    from ..writers import available_writers

    for name in available_writers():
        typer.echo(name)


def list_models() -> None:
    """List the model architectures --model accepts."""
    from ..models import MODELS

    for spec in MODELS.values():
        typer.echo(f"{spec.name:28s} {spec.description}")
