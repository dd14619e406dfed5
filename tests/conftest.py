"""Shared fixtures. Tests are offline: hub access is disabled and any non-loopback connection fails the test."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import micro_config

# One compute thread per process (subprocesses inherit it): the micro models gain nothing from more, and on a
# shared 2-core machine OpenMP threads that spin while descheduled make steps up to 100x slower.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("WANDB_MODE", "disabled")
# The micro-batch probe and gallery caches live in a folder of this session, not in the user's ~/.cache.
os.environ["FINDERPARTNER_CACHE"] = tempfile.mkdtemp(prefix="finderpartner-test-cache-")

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address, *args, **kwargs):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost", "0.0.0.0"):
        raise RuntimeError(f"test tried to reach the network ({address}); tests must stay offline")
    return _real_connect(self, address, *args, **kwargs)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 train / 24 val sample images at 48 px (two captions each)."""
    from finderpartner.data.sample import make_sample_data

    root = tmp_path_factory.mktemp("data") / "sample"
    make_sample_data(root, train_images=64, val_images=24, image_size=48)
    return root


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """best_model/ of a short micro-model run (shared by eval, search, index, export and demo tests)."""
    from finderpartner.config import config_from_dict
    from finderpartner.train import train

    tmp = tmp_path_factory.mktemp("trained")
    result = train(config_from_dict(micro_config(tmp, small_data, epochs=2)))
    return result.best_model


# Session and module fixtures that train a model: the first test that asks for one waits for a whole training, so
# every test that uses one (directly or through another fixture) is `slow`, like the files that train or start
# processes themselves (their module-level `pytestmark`). `pytest -m "not slow"` (make test-fast) is the rest.
TRAINING_FIXTURES = {"trained_model", "towers_model"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
