"""SoftPromptComp: soft tokens of the stated shape feed the frozen text tower (checked against the
plain encoder on a closed form), the objective against its definition, training lowers the loss and
leaves every CLIP weight bit-identical, and a saved compressor loads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cliplab.errors import CheckpointMismatch, ModelLoadError, UsageError
from cliplab.generative.softpromptcomp import (LongCaptionIds, SoftPromptComp, SoftPromptCompLoss,
                                               SoftPromptCompressor, load_softpromptcomp, long_token_ids,
                                               train_softpromptcomp)
from cliplab.train.losses.base import ModelOutputs

from _generative_data import LONG


def _comp(backbone, k=5, seed=0):
    torch.manual_seed(seed)
    return SoftPromptComp(backbone, SoftPromptCompressor(backbone.model.token_embedding.weight.shape[1], k=k))


def test_long_ids_are_not_cut_at_the_context(shapes_tiny):
    tok = shapes_tiny.tokenizer
    ids = long_token_ids(tok, [LONG, "a red circle"], max_tokens=128)
    n = len(tok.encode(LONG)) + 2
    assert n > shapes_tiny.context_length and ids.shape == (2, 128)
    assert ids[0, 0] == tok.sot_token_id and ids[0, n - 1] == tok.eot_token_id and (ids[0, n:] == 0).all()
    assert ids[0, 1:n - 1].tolist() == tok.encode(LONG)


def test_soft_tokens_have_the_stated_shape_and_feed_the_text_tower(shapes_tiny):
    comp = _comp(shapes_tiny, k=5)
    soft = comp.soft_tokens([LONG, "a red circle"])
    assert soft.shape == (2, 5, 128) and soft.dtype == np.float32
    feats = comp.encode_soft_tokens(soft)
    assert feats.shape == (2, shapes_tiny.embed_dim) and np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(comp.encode_long_texts([LONG, "a red circle"]), feats, atol=1e-5)
    moved = soft.copy()
    moved[0, 2] += np.random.default_rng(0).normal(0, 0.5, 128).astype(np.float32)   # not a constant: LN removes those
    changed = comp.encode_soft_tokens(moved)
    assert np.abs(changed[0] - feats[0]).max() > 1e-3                   # the tokens reach the output
    np.testing.assert_allclose(changed[1], feats[1], atol=1e-6)          # and only their own row


def test_word_embeddings_as_soft_tokens_give_the_plain_text_feature(shapes_tiny):
    """Closed form: [start, E[words], end] through eq. (3) is the tokenized caption itself."""
    comp = _comp(shapes_tiny)
    caption = "a large red circle at the top left"
    words = torch.tensor(shapes_tiny.tokenizer.encode(caption))
    soft = shapes_tiny.model.token_embedding(words).detach().numpy()[None]       # (1, k', W)
    np.testing.assert_allclose(comp.encode_soft_tokens(soft), shapes_tiny.encode_texts([caption]), atol=1e-5)


def test_objective_is_the_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    x, y = (torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1) for _ in range(2))
    loss = SoftPromptCompLoss()(ModelOutputs(x, y, torch.tensor(10.0)))["contrastive"].item()
    z = 10.0 * x.double().numpy() @ y.double().numpy().T

    def ce(m):
        m = m - m.max(1, keepdims=True)
        return float(-(np.diag(m) - np.log(np.exp(m).sum(1))).mean())

    assert loss == pytest.approx((ce(z) + ce(z.T)) / 2, abs=1e-5)


def test_training_lowers_the_loss_and_leaves_clip_bit_identical(shapes_tiny, tmp_path, one_thread):
    from cliplab.surgery.longclip import longclip_world

    before = {k: v.clone() for k, v in shapes_tiny.model.state_dict().items()}
    flags = [p.requires_grad for p in shapes_tiny.model.parameters()]
    data = LongCaptionIds(longclip_world(), shapes_tiny.tokenizer, n=512)
    comp = train_softpromptcomp(shapes_tiny, 24, tmp_path / "run", k=4, train_set=data, batch_size=16,
                                warmup_steps=2, log_every=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_contrastive"] < 0.7 * rows[0]["loss_contrastive"]
    for k, v in shapes_tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k                                  # the towers did not move
    assert [p.requires_grad for p in shapes_tiny.model.parameters()] == flags
    # save / load: the same features from a fresh compressor
    path = comp.save(tmp_path / "comp.safetensors")
    again = load_softpromptcomp(shapes_tiny, path)
    assert again.k == 4
    np.testing.assert_allclose(again.encode_long_texts([LONG]), comp.encode_long_texts([LONG]), atol=1e-6)


def test_errors(shapes_tiny, tmp_path):
    with pytest.raises(UsageError, match="do not fit the context"):
        _comp(shapes_tiny, k=31)
    with pytest.raises(UsageError, match="exceed the context"):
        _comp(shapes_tiny).encode_soft_tokens(np.zeros((1, 31, 128), np.float32))
    with pytest.raises(UsageError, match=r"\(N, k, 128\)"):
        _comp(shapes_tiny).encode_soft_tokens(np.zeros((1, 3, 64), np.float32))
    with pytest.raises(CheckpointMismatch, match="64 wide"):
        SoftPromptComp(shapes_tiny, SoftPromptCompressor(64, k=3))
    with pytest.raises(ModelLoadError, match="not found"):
        load_softpromptcomp(shapes_tiny, tmp_path / "absent.safetensors")


def test_corrupt_or_foreign_compressor_files_raise_model_load_errors(shapes_tiny, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable") as info:
        load_softpromptcomp(shapes_tiny, bad)
    assert "\n" not in str(info.value)
    path = _comp(shapes_tiny, k=3).save(tmp_path / "comp.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(state, str(tmp_path / "list.safetensors"), metadata={**meta, "config": "[1, 2]"})
    with pytest.raises(CheckpointMismatch, match="do not fit"):
        load_softpromptcomp(shapes_tiny, tmp_path / "list.safetensors")
    save_file(state, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    with pytest.raises(CheckpointMismatch, match="not a SoftPromptComp"):
        load_softpromptcomp(shapes_tiny, tmp_path / "other.safetensors")
