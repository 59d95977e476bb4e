"""The captioner: teacher forcing through the Trainer, frozen Backbone, decoding, files, scores."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cliplab
from cliplab.data.shapes import shapes_tiny_world
from cliplab.data.shapes.worlds import task_world
from cliplab.errors import CheckpointMismatch, ModelLoadError, UsageError
from cliplab.generative.captioner import (Captioner, attribute_accuracy, cider, load_captioner, parse_caption,
                                          simple_tokenize, train_captioner)
from cliplab.generative.lightcap import LightCap
from cliplab.models.transforms import uint8_to_tensor


@pytest.fixture(scope="module")
def bb():
    return cliplab.load("shapes-tiny")


@pytest.fixture(scope="module")
def scenes():
    world = task_world(shapes_tiny_world(seed=0), "captions")
    return world.render_batch("train", list(range(4)))


class Tiny:
    """Four ShapesWorld scenes, each with its canonical caption only."""

    def __init__(self, images, scenes):
        self.images, self.scenes = images, scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        return self.images[i], [self.scenes[i].captions[0]]


@pytest.mark.parametrize("cls", [Captioner, LightCap])
def test_teacher_forcing_loss_falls_and_the_callers_backbone_is_unchanged(bb, scenes, cls, tmp_path, one_thread):
    flags = [p.requires_grad for p in bb.model.parameters()]
    bb.model.train()                                                           # the caller's mode
    bb.model.visual.proj.requires_grad_(False)                                 # and a mix of flags
    try:
        before_flags = [p.requires_grad for p in bb.model.parameters()]
        head = cls.build(bb, width=32, layers=1, heads=2)
        assert not any(n.startswith("clip.") for n, _ in head.named_parameters())   # not a submodule
        before = {k: v.clone() for k, v in bb.model.state_dict().items()}
        images, sc = scenes
        train_captioner(head, Tiny(images, sc), steps=40, batch_size=4, lr=1e-2, warmup_steps=0,
                        out_dir=tmp_path / "run", progress=False)
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["loss_caption"] < 0.3 * rows[0]["loss_caption"]           # it learns the 4 captions
        assert [p.requires_grad for p in bb.model.parameters()] == before_flags    # flags as the caller left them
        assert bb.model.training and all(m.training for m in bb.model.modules())   # and its train mode
        assert all(p.grad is None for p in bb.model.parameters())                  # frozen while training
        for k, v in bb.model.state_dict().items():                                 # bit-identical Backbone
            assert torch.equal(v, before[k]), k
    finally:
        bb.model.eval()
        for p, flag in zip(bb.model.parameters(), flags):
            p.requires_grad_(flag)
    x = uint8_to_tensor(list(images), bb.preprocess_cfg)
    caps = head.generate(x)
    assert sum(c == s.captions[0] for c, s in zip(caps, sc)) >= 3              # memorised (teacher forcing works)


def test_decoding_shapes_determinism_and_files(bb, scenes, tmp_path):
    head = Captioner.build(bb, width=32, layers=1, heads=2, seed=3)
    images, _ = scenes
    x = uint8_to_tensor(list(images), bb.preprocess_cfg)                       # (4, 3, 64, 64)
    ids = head.generate_ids(x)
    assert len(ids) == 4 and all(len(r) <= bb.context_length - 1 for r in ids)
    assert all(i in set(head.config["vocab"]) and i != head.tokenizer.sot_token_id for r in ids for i in r)
    assert head.generate_ids(x) == ids                                         # deterministic
    assert head.generate_ids(x, beam=1) == ids
    short = head.generate_ids(x, max_length=4)
    assert all(len(r) <= 3 for r in short)
    beam = head.generate_ids(x, beam=3)
    assert len(beam) == 4 and head.generate_ids(x, beam=3) == beam
    with pytest.raises(UsageError, match="beam"):
        head.generate_ids(x, beam=0)
    tokens = bb.tokenize(["a red star", "a zebra"])                          # (2, 32) BPE ids
    sub = head.to_sub_ids(tokens)
    vocab = torch.tensor(head.config["vocab"])
    assert torch.equal(vocab[sub[0, :5]], tokens[0, :5])                      # known words map back
    assert 2 in sub[1].tolist()                                               # "zebra": the unknown slot
    assert head.to_sub_ids(torch.tensor([[10 ** 6, -1]])).tolist() == [[2, 2]]
    # save / load: same captions; wrong or corrupt files refused with the project's errors
    head.save(tmp_path / "cap")
    again = load_captioner(tmp_path / "cap", bb)
    assert again.generate(x) == head.generate(x)
    assert sorted(p.name for p in (tmp_path / "cap").iterdir()) == ["captioner.json", "captioner.safetensors"]
    with pytest.raises(ModelLoadError, match="no such captioner folder"):
        load_captioner(tmp_path / "missing", bb)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captioner.json").write_text((tmp_path / "cap" / "captioner.json").read_text())
    (bad / "captioner.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="corrupt or unreadable weights"):
        load_captioner(bad, bb)
    (bad / "captioner.json").write_text('{"format": "something else"}')
    with pytest.raises(ModelLoadError, match="not a cliplab captioner config"):
        load_captioner(bad, bb)
    (bad / "captioner.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable captioner config"):
        load_captioner(bad, bb)
    other = bb.with_model(bb.model, name="other")                             # same weights: accepted
    load_captioner(tmp_path / "cap", other)
    import copy

    changed = copy.deepcopy(bb.model)
    with torch.no_grad():
        changed.visual.proj.add_(1.0)
    with pytest.raises(CheckpointMismatch, match="another Backbone"):
        load_captioner(tmp_path / "cap", bb.with_model(changed, name="changed"))


def test_cider_ranks_identical_captions_above_wrong_ones_and_is_pycocoevalcaps():
    from pycocoevalcap.cider.cider import Cider

    refs = [["a small red star at the top left", "a red star"],
            ["a large blue circle in the center", "a blue circle"],
            ["a small green ring on the right", "there is a green ring, small"]]
    right = [r[0] for r in refs]
    wrong = ["a large yellow hexagon at the bottom", "a small cyan cross on the left", "a purple diamond"]
    s_right, per_right = cider(right, refs)
    s_wrong, _ = cider(wrong, refs)
    assert s_right > s_wrong + 1.0
    ref_score, ref_scores = Cider().compute_score(
        {i: [simple_tokenize(c) for c in r] for i, r in enumerate(refs)},
        {i: [simple_tokenize(c)] for i, c in enumerate(right)})
    assert s_right == pytest.approx(ref_score, abs=1e-12)
    np.testing.assert_allclose(per_right, ref_scores, atol=1e-12)
    assert simple_tokenize("A red star, at the TOP-left.") == "a red star at the top left"
    with pytest.raises(UsageError, match="at least 2"):
        cider(["a"], [["a"]])


def test_parse_caption_and_attribute_accuracy_on_hand_written_captions():
    assert parse_caption("a small red star at the top left, a large circle in blue and a green ring").objects == [
        ("red", "star"), ("blue", "circle"), ("green", "ring")]
    p = parse_caption("a photo of two shapes: a yellow triangle and a yellow triangle.")
    assert p.objects == [("yellow", "triangle")] * 2 and p.count == 2
    assert parse_caption("three shapes: a red star").count == 3                # the count word wins
    assert parse_caption("a small star").objects == []                         # no colour: no object

    def scene(*objs):
        return SimpleNamespace(objects=[SimpleNamespace(color=c, shape=s) for c, s in objs])

    scenes = [scene(("red", "star")), scene(("blue", "circle"), ("green", "ring")), scene(("cyan", "cross"))]
    captions = ["a small red star in the center",          # all right
                "a blue circle and a green square",        # ring -> square: shape wrong, colour right
                "a large cyan cross and a red star"]       # one extra object
    acc = attribute_accuracy(captions, scenes)
    assert acc["color"] == pytest.approx(4 / 4)
    assert acc["shape"] == pytest.approx(3 / 4)
    assert acc["object"] == pytest.approx(3 / 4)
    assert acc["precision"] == pytest.approx(3 / 5)
    assert acc["count"] == pytest.approx(2 / 3)
    assert acc["exact"] == pytest.approx(1 / 3)


def test_objective_is_cross_entropy_up_to_the_end_token(bb, scenes):
    from cliplab.generative.captioner import CaptionObjective
    from cliplab.train.losses.base import Batch

    head = Captioner.build(bb, width=32, layers=1, heads=2, seed=1)
    images, _ = scenes
    x = uint8_to_tensor(list(images[:2]), bb.preprocess_cfg)
    tokens = bb.tokenize(["a red star", "a small blue circle in the center"])  # different lengths
    obj = CaptionObjective()
    batch = Batch(images=x, tokens=tokens)
    loss = obj(obj.forward_model(head, batch), batch)["caption"]
    terms = []
    for i in range(2):                                  # by hand: each caption alone, up to its end token
        ids = head.to_sub_ids(tokens[i:i + 1])
        end = int((tokens[i] == head.tokenizer.eot_token_id).nonzero()[0])
        logits = head(x[i:i + 1], ids[:, :end])         # predicts tokens 1..end
        terms.append(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:end + 1], reduction="none"))
    torch.testing.assert_close(loss, torch.cat(terms).mean(), rtol=1e-5, atol=1e-6)


def test_corrupt_configs_are_refused_with_one_line_model_load_errors(bb, tmp_path):
    head = Captioner.build(bb, width=32, layers=1, heads=2)
    head.save(tmp_path / "cap")
    good = json.loads((tmp_path / "cap" / "captioner.json").read_text())
    mutations = {
        "fingerprint an int": lambda m: m["backbone"].update(fingerprint=5),
        "config a string": lambda m: m.update(config="abc"),
        "backbone a string": lambda m: m.update(backbone="x"),
        "huge vocab id": lambda m: m["config"]["vocab"].__setitem__(5, 10 ** 11),
        "bool vocab id": lambda m: m["config"]["vocab"].__setitem__(5, True),
        "huge context": lambda m: m["config"].update(context_length=10 ** 6),
        "huge width": lambda m: m["config"].update(width=2 ** 30, heads=2),
        "other vision width": lambda m: m["config"].update(vision_width=7),
        "unknown kind": lambda m: m.update(kind=3),
        "bad precision": lambda m: m["backbone"].update(precision="fp8"),
    }
    for what, mutate in mutations.items():
        meta = json.loads(json.dumps(good))
        mutate(meta)
        (tmp_path / "cap" / "captioner.json").write_text(json.dumps(meta))
        with pytest.raises(ModelLoadError) as e:
            load_captioner(tmp_path / "cap", bb)
        assert "malformed captioner config" in str(e.value) and "\n" not in str(e.value), what


def test_lightcap_config_with_bad_concepts_is_refused(bb, tmp_path):
    LightCap.build(bb, width=32, layers=1, heads=2).save(tmp_path / "lc")
    meta = json.loads((tmp_path / "lc" / "captioner.json").read_text())
    for concepts, top_k in (("colours", meta["config"]["top_k"]), (meta["config"]["concepts"], {"color": 99})):
        meta["config"].update(concepts=concepts, top_k=top_k)
        (tmp_path / "lc" / "captioner.json").write_text(json.dumps(meta))
        with pytest.raises(ModelLoadError, match="malformed captioner config"):
            load_captioner(tmp_path / "lc", bb)


def test_beam_is_limited_and_caption_reads_through_the_backbone(bb, scenes):
    from cliplab.generative.captioner import MAX_BEAM

    head = Captioner.build(bb, width=32, layers=1, heads=2, seed=2)
    images, _ = scenes
    x = uint8_to_tensor(list(images), bb.preprocess_cfg)                       # (4, 3, 64, 64)
    V = len(head.config["vocab"])
    with pytest.raises(UsageError, match="too wide"):
        head.generate_ids(x[:1], beam=min(MAX_BEAM, V) + 1)
    for bad in (0, 2.5, True):
        with pytest.raises(UsageError, match="beam"):
            head.generate(x[:1], beam=bad)
    # the Backbone's tokens: the same as Backbone.image_tokens; its image path: arrays, tensors, batches
    _, tokens = bb.image_token_batch(x)
    np.testing.assert_allclose(tokens.numpy(), bb.image_tokens(x), atol=1e-6)
    want = head.generate(x)
    assert head.caption(list(images)).captions == want                         # uint8 arrays
    assert head.caption(x, batch_size=3).captions == want                      # preprocessed tensors, 2 batches
    parts = list(head.iter_captions(list(images), batch_size=3))
    assert [p.kept for p in parts] == [[0, 1, 2], [3]]
    assert head.caption(list(images), batch_size=10 ** 9).kept == [0, 1, 2, 3]   # clamped, no huge buffer


def test_training_runs_on_the_backbones_device_and_checkpoints_hold_the_head_only(bb, monkeypatch, tmp_path):
    import cliplab.train

    seen = {}

    class Spy(cliplab.train.Trainer):
        def __init__(self, model, *args, **kw):
            seen["config"] = args[3]
            super().__init__(model, *args, **kw)

    monkeypatch.setattr(cliplab.train, "Trainer", Spy)
    head = Captioner.build(bb, width=32, layers=1, heads=2)
    train_captioner(head, steps=1, batch_size=2, out_dir=tmp_path / "run", progress=False)
    assert seen["config"].device == str(bb.device)
    from safetensors.torch import load_file

    files = list((tmp_path / "run").rglob("*.safetensors"))
    for f in files:                                                            # no Backbone weights in the run
        assert not any(k.startswith(("clip.", "visual.", "transformer.resblocks")) for k in load_file(str(f))), f
