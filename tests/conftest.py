"""Shared fixtures: tiny random-init CLIP models saved to disk, as a user would have them."""

from __future__ import annotations

import os

import pytest
import torch

from _tiny import TINY_CFG, make_model

os.environ.setdefault("CLIPLAB_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path_factory, monkeypatch):
    """No test writes to the user's default feature cache."""
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """An open_clip folder (config + safetensors) of a tiny random CLIP."""
    from cliplab.models.convert import save_open_clip_folder

    out = tmp_path_factory.mktemp("tiny-clip")
    save_open_clip_folder(out, TINY_CFG, make_model().state_dict())
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import cliplab

    return cliplab.load(tiny_dir)


@pytest.fixture(scope="session")
def tiny_minilm(tiny):
    """The tiny CLIP's image tower with an all-MiniLM-L6-v2 text tower (random adapter)."""
    from cliplab.models.sentence import sentence_backbone

    return sentence_backbone(tiny, blocks=1, expansion=2)


@pytest.fixture(scope="session")
def tiny_minilm_dir(tiny_minilm, tmp_path_factory):
    """:func:`tiny_minilm` saved as a folder (``cliplab.load`` reads it)."""
    return tiny_minilm.save(tmp_path_factory.mktemp("tiny-minilm") / "tiny-minilm")
