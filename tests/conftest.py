"""Shared fixtures: ONNX exports of the test models, made once per cache folder.

Exports are cached under .cache/models (or $RESCOMPILE_MODEL_CACHE) so that the
pytest-xdist workers and repeated runs share them; each file is written
atomically, so concurrent workers never see a partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RESCOMPILE_MODEL_CACHE", ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def onnx_model():
    """onnx_model(name, exporter="dynamo") -> Path of a cached ONNX export."""
    from tools.models import cached_onnx

    def get(name: str, exporter: str = "dynamo") -> Path:
        return cached_onnx(name, exporter, CACHE)
    return get


@pytest.fixture
def model_copy(onnx_model, tmp_path):
    """A private copy (model + external data) that a test may modify or delete."""
    def get(name: str, exporter: str = "dynamo") -> Path:
        src = onnx_model(name, exporter)
        for f in src.parent.glob(src.name + "*"):
            shutil.copy(f, tmp_path / f.name)
        return tmp_path / src.name
    return get
