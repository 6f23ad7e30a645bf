"""Shared test set-up: the helper modules of this folder and fixtures used by several test files.

pytest puts this folder on ``sys.path`` (rootdir-relative "prepend" imports), so the helper
modules are imported by name (``from _models import tiny_model``); ``train.py`` subprocesses
get the same folder on their ``PYTHONPATH`` (``_training.script_env``) to load probe callbacks.
"""

from __future__ import annotations

import pytest
import torch

from streamlic.images import demo_images


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four 64x64 centre crops of real demo training photos."""
    crops = []
    for _, image in demo_images("train")[:4]:
        _, h, w = image.shape
        crops.append(image[:, h // 2 - 32:h // 2 + 32, w // 2 - 32:w // 2 + 32])
    return torch.stack(crops)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for in-process training runs, as in the ``train.py`` subprocesses.

    The tiny model gains nothing from more, and OpenMP threads that wait for each other on a
    busy 2-core machine make every small op ten times slower (``_training.script_env``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
