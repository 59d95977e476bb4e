"""LLM2CLIP and ProCLIP through the one Trainer: losses against closed forms, what trains and what stays."""

import numpy as np
import pytest
import torch

from cliplab.train import TrainConfig
from cliplab.train.losses.base import Batch, ModelOutputs
from cliplab.train.text_tower import (PairedTokenizer, ProCLIPSelfDistillation, distillation_terms, proclip_align,
                                      proclip_tune, train_llm2clip)


def _unit(*shape, seed):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_distillation_terms_closed_form():
    """sum of squared differences, and sum over pairs a < b of SmoothL1(|s_a - s_b| - |t_a - t_b|), beta 1."""
    s, t = _unit(5, 4, seed=0), _unit(5, 4, seed=1)
    instance, structure = distillation_terms(s, t)
    assert instance.item() == pytest.approx(float(((s - t) ** 2).sum()), rel=1e-6)
    want = 0.0
    for a in range(5):
        for b in range(a + 1, 5):
            d = abs(float((s[a] - s[b]).norm()) - float((t[a] - t[b]).norm()))
            want += 0.5 * d * d if d < 1 else d - 0.5
    assert structure.item() == pytest.approx(want, rel=1e-5)
    zero = distillation_terms(s, s.clone())
    assert zero[0].item() == 0 and zero[1].item() == pytest.approx(0, abs=1e-6)


def test_self_distillation_weight_and_terms():
    """Stage 2: InfoNCE plus w times both terms against the frozen teacher's image features."""
    visual = torch.nn.Linear(3, 4)
    img, txt = _unit(6, 4, seed=2), _unit(6, 4, seed=3)
    teacher = _unit(6, 4, seed=4)
    out = ModelOutputs(img, txt, torch.tensor(10.0), extras={"teacher_image_features": teacher})
    terms = ProCLIPSelfDistillation(visual, distill_weight=0.25)(out)
    instance, structure = distillation_terms(img, teacher)
    logits = 10 * img @ txt.T
    labels = torch.arange(6)
    infonce = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert set(terms) == {"contrastive", "instance", "structure"}
    assert terms["contrastive"].item() == pytest.approx(infonce.item(), rel=1e-6)
    assert terms["instance"].item() == pytest.approx(0.25 * instance.item(), rel=1e-6)
    assert terms["structure"].item() == pytest.approx(0.25 * structure.item(), rel=1e-6)
    assert not any(p.requires_grad for p in ProCLIPSelfDistillation(visual).teacher_visual.parameters())
    with pytest.raises(ValueError, match="distill_weight"):
        ProCLIPSelfDistillation(visual, distill_weight=-1)


def test_paired_tokenizer_splits_back(tiny, tiny_minilm):
    paired = PairedTokenizer(tiny_minilm.tokenizer, tiny.tokenizer)
    texts = ["a red star", "two blue circles"]
    ids = paired(texts)
    assert ids.shape == (2, 256 + 24)
    student, teacher = paired.split(ids)
    assert torch.equal(student, tiny_minilm.tokenize(texts)) and torch.equal(teacher, tiny.tokenize(texts))


class _Captions:
    """8 random images with two captions each."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        colours = ["red", "blue", "green", "pink", "cyan", "grey", "black", "white"]
        self.captions = [[f"a {c} square", f"there is a square coloured {c}"] for c in colours]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_llm2clip_trains_image_tower_and_adapter_not_the_encoder(tiny, tmp_path):
    visual_before = _snapshot(tiny.model.visual)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ckpt_every=0, log_every=1,
                         out_dir=str(tmp_path / "run"))
    bb = train_llm2clip(tiny, _Captions(), config, progress=False)
    model = bb.model
    assert len(model.adapter.blocks) == 4 and not model.training
    assert not _changed(visual_before, tiny.model.visual)                  # the given CLIP is untouched
    assert _changed(visual_before, model.visual) and model.encoder_frozen
    from cliplab.models.sentence import SentenceEncoder, encoder_path

    fresh = SentenceEncoder(encoder_path("all-MiniLM-L6-v2")).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.encoder.state_dict().items())
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "loss_contrastive" in rows[-1]


def test_proclip_stage1_trains_only_the_adapter_towards_clip_text(tiny, tmp_path):
    data = _Captions()
    config = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, ckpt_every=0, log_every=1,
                         out_dir=str(tmp_path / "s1"))
    bb = proclip_align(tiny, data, config, progress=False)
    assert len(bb.model.adapter.blocks) == 1
    np.testing.assert_allclose(bb.encode_images(data.images).features, tiny.encode_images(data.images).features,
                               atol=1e-6)                                  # the image tower did not move
    import json

    rows = [json.loads(r) for r in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"loss_instance", "loss_structure"}
    assert rows[-1]["loss"] < rows[0]["loss"]                               # the adapter moves towards CLIP
    assert all(p.requires_grad for p in bb.model.visual.parameters())     # unfrozen for stage 2

    before = _snapshot(bb.model.visual)
    tuned = proclip_tune(bb, data, TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ckpt_every=0,
                                               log_every=1, out_dir=str(tmp_path / "s2")), progress=False)
    assert tuned is bb and _changed(before, bb.model.visual)
    first = json.loads((tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_instance"] < 1e-9                                  # student == teacher at the first step
