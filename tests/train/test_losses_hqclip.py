"""HQ-CLIP: negative descriptions in the softmax, the tag loss, ShapesWorld negatives and tags, a Trainer run."""

import json
import math

import numpy as np
import pytest
import torch

from cliplab.data.shapes import COLORS, TAGS, ShapesWorld
from cliplab.data.shapes.captions import canonical_caption
from cliplab.train import TrainConfig, Trainer, init_model
from cliplab.train.datasets import ConcatSet, ShapesTrainSet
from cliplab.train.losses import Batch, ModelOutputs, get_loss
from cliplab.train.losses.hqclip import negative_description_nce, tag_classification_loss
from cliplab.train.losses.infonce import infonce_loss


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
            for s in ((n, d), (n, d), (n, 2, d))]


def test_a_negative_equal_to_the_positive_counts_it_twice():
    img, txt, _ = _features(4, 5, 0)
    t = 3.0
    z = t * (img @ txt.T).numpy()
    i2t = np.mean([-z[i, i] + np.log(np.exp(z[i]).sum() + np.exp(z[i, i])) for i in range(4)])
    t2i = np.mean([-z[i, i] + np.log(np.exp(z[:, i]).sum()) for i in range(4)])
    ours = negative_description_nce(img, txt, txt[:, None], t).item()
    assert ours == pytest.approx((i2t + t2i) / 2, abs=1e-12)


def test_no_negatives_is_infonce_and_negatives_raise_the_loss():
    img, txt, neg = _features(5, 6, 1)
    t = torch.tensor(4.0, dtype=torch.float64)
    plain = get_loss("hqclip")(ModelOutputs(img, txt, t))
    assert set(plain) == {"contrastive"}                                 # no tags given: no tag term
    torch.testing.assert_close(plain["contrastive"], infonce_loss(img, txt, t), atol=1e-12, rtol=0)
    assert negative_description_nce(img, txt, neg, t) > plain["contrastive"]


def test_tag_loss_closed_form_and_where_gradients_go():
    img, txt, neg = _features(3, 4, 2)
    tag_features = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    tags = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    t = 2.0
    z = t * (img @ tag_features.T).numpy()
    m = tags.numpy()
    bce = -(m * np.log(1 / (1 + np.exp(-z))) + (1 - m) * np.log(1 - 1 / (1 + np.exp(-z)))).mean()
    assert tag_classification_loss(img, tag_features, tags, t).item() == pytest.approx(bce, abs=1e-12)

    leaves = [x.clone().requires_grad_(True) for x in (img, txt, neg, tag_features)]
    log_t = torch.tensor(math.log(t), dtype=torch.float64, requires_grad=True)
    outputs = ModelOutputs(leaves[0], leaves[1], log_t.exp(), extra_text_features=leaves[2],
                           extras={"tag_features": leaves[3]})
    terms = get_loss("hqclip", tags=list("abcde"), tag_weight=0.5)(outputs, Batch(images=None, targets={"tags": tags}))
    assert terms["tags"].item() == pytest.approx(0.5 * bce, abs=1e-12)
    terms["tags"].backward()                              # the tag term: image features and tag embeddings only
    assert [x.grad is not None and x.grad.abs().sum() > 0 for x in leaves] == [True, False, False, True]
    assert log_t.grad is None                             # ... and it does not train the temperature
    terms["contrastive"].backward()                       # negatives get gradient from image->text only
    assert leaves[2].grad.abs().sum() > 0 and log_t.grad.item() != 0


def test_tag_vocabulary_width_is_checked():
    img, txt, neg = _features(2, 4, 3)
    with pytest.raises(ValueError, match="tag vocabulary has"):
        get_loss("hqclip")(ModelOutputs(img, txt, torch.tensor(1.0)), Batch(None, targets={"tags": torch.ones(2, 3)}))


def test_shapes_train_set_negatives_swap_one_attribute_and_tags_are_multi_hot():
    world = ShapesWorld(seed=0, image_size=32, n_objects=(1, 3), split_sizes={"train": 40, "val": 4, "test": 4})
    ds = ShapesTrainSet(world, "train", negatives=2, tags=True)
    heldout = set(world.heldout)
    for i in range(40):
        image, captions, extras = ds[i]
        scene = world.scene("train", i)
        assert captions == scene.captions and canonical_caption(scene.objects) == captions[0]
        for neg in extras["extra_captions"]:
            a, b = captions[0].split(), neg.split()
            changed = [(x, y) for x, y in zip(a, b) if x != y]
            assert len(a) == len(b) and len(changed) == 1                  # exactly one word swapped
            old, new = changed[0]
            assert (old in COLORS) == (new in COLORS) and old in TAGS and new in TAGS
            assert not any(f"{c} {s}" in neg for c, s in heldout)         # no held-out composition
        words = {o.color for o in scene.objects} | {o.shape for o in scene.objects}
        np.testing.assert_array_equal(extras["targets"]["tags"], [t in words for t in TAGS])
    images, caps, extras = ConcatSet(ds).get_batch([3, 7])              # batch loading carries them too
    for e, i in zip(extras, (3, 7)):
        assert e["extra_captions"] == ds[i][2]["extra_captions"]         # a pure function of the index
        np.testing.assert_array_equal(e["targets"]["tags"], ds[i][2]["targets"]["tags"])
    assert len(ShapesTrainSet(world, "train")[0]) == 2                   # off by default: (image, captions)


CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_trains_on_shapes_world_and_resumes_bit_exact(tmp_path):
    from safetensors.torch import load_file

    world = ShapesWorld(seed=0, image_size=32, n_objects=(1, 2), split_sizes={"train": 64, "val": 4, "test": 4})

    def fit(out, **kw):
        built = init_model(CFG, loss="hqclip")
        config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2, log_every=1,
                             out_dir=str(out), loss="hqclip", device="cpu")
        Trainer(built.model, built.tokenizer, built.preprocess, ShapesTrainSet(world, negatives=1, tags=True),
                config, model_cfg=built.model_cfg, progress=False).fit(**kw)

    fit(tmp_path / "a")
    fit(tmp_path / "b", stop_at=2)
    fit(tmp_path / "b", resume=True)
    wa = load_file(str(tmp_path / "a/checkpoints/step_0000004/open_clip_model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_0000004/open_clip_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for r in rows[0]:                                   # both terms logged, and they make the loss
        assert r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_tags"], rel=1e-6)
        assert 0 < r["loss_tags"] < 2 and np.isfinite(r["loss_contrastive"])
    assert [(r["loss_contrastive"], r["loss_tags"]) for r in rows[0]] == [
        (r["loss_contrastive"], r["loss_tags"]) for r in rows[1]]
    assert init_model(CFG, loss="hqclip").model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
