"""Shared by the inspection tests: the tiny model loaded once per module, the fruits_nuts annotations."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskseg.config import ModelConfig
from maskseg.inspection import StageOutputs, inspect_image
from maskseg.models import load_model

ROOT = Path(__file__).resolve().parents[1]  # tests/, which holds data/
FRUITS = ROOT / "data" / "fruits_nuts"
ANN = FRUITS / "trainval.json"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(ModelConfig(weights=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def with_targets(loaded) -> StageOutputs:
    return inspect_image(FRUITS / "images" / "3.jpg", loaded, targets=ANN, seed=7)
