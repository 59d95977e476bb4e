"""LightCLIP: softened labels, relaxed patch-word matching and image-conditioned MLM against closed forms."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.shapes import ShapesWorld
from cliplab.train import TrainConfig, Trainer, init_model
from cliplab.train.datasets import ShapesTrainSet
from cliplab.train.losses import Batch, ModelOutputs, get_loss
from cliplab.train.losses.infonce import infonce_loss
from cliplab.train.losses.lightclip import (_image_tokens, label_softening_weight, mlm_mask, relaxed_matching_scores,
                                            softened_labels, soft_label_nce, token_alignment_nce, word_positions)

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
CAPTIONS = ["a red circle", "a small blue star at the top left", "a green square", "a large yellow heart"]


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


def _built(seed=0):
    torch.manual_seed(seed)
    built = init_model(CFG, loss="lightclip", seed=seed)
    objective = get_loss("lightclip")
    objective.setup(built.model)
    batch = Batch(images=torch.randn(4, 3, 32, 32), tokens=built.tokenizer(CAPTIONS), step=3, total_steps=10)
    return built, objective, batch


def test_soft_labels_are_one_hot_at_step_zero_and_follow_the_linear_schedule():
    assert [label_softening_weight(s, 100, 0.2) for s in (0, 25, 50, 100, 150)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.2, 0.2])
    x, y = _features(5, 8, 0)
    logits = 10 * x @ y.T
    assert torch.equal(softened_labels(logits, 0.0), torch.eye(5, dtype=torch.float64))
    # alpha on the negatives, spread by exp(logit) among the negatives only; the positive keeps 1 - alpha
    alpha = 0.3
    z = logits.numpy()
    expected = np.zeros((5, 5))
    for i in range(5):
        neg = [j for j in range(5) if j != i]
        w = np.exp(z[i, neg]) / np.exp(z[i, neg]).sum()
        expected[i, neg] = alpha * w
        expected[i, i] = 1 - alpha
    np.testing.assert_allclose(softened_labels(logits, alpha).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(softened_labels(logits, alpha, "uniform").numpy(),
                               (1 - alpha) * np.eye(5) + alpha * (1 - np.eye(5)) / 4, atol=1e-12)
    # the loss: InfoNCE at alpha 0, the soft-target cross-entropy by hand otherwise
    assert soft_label_nce(x, y, 10.0, 0.0).item() == pytest.approx(infonce_loss(x, y, 10.0).item(), abs=1e-12)
    log_p, log_q = np.log(_softmax(z)), np.log(_softmax(z.T))
    t_i2t = softened_labels(logits, alpha).numpy()
    t_t2i = softened_labels(logits.T, alpha).numpy()
    hand = (-(t_i2t * log_p).sum(1).mean() - (t_t2i * log_q).sum(1).mean()) / 2
    assert soft_label_nce(x, y, 10.0, alpha).item() == pytest.approx(hand, abs=1e-12)


def test_the_objective_reads_the_schedule_from_the_batch():
    x, y = _features(6, 8, 1)
    outputs = ModelOutputs(x, y, torch.tensor(10.0, dtype=torch.float64))
    objective = get_loss("lightclip", alpha_max=0.4, token_weight=0, mlm_weight=0)
    at = {s: objective(outputs, Batch(images=None, step=s, total_steps=8))["contrastive"].item() for s in (0, 4, 8)}
    assert at[0] == pytest.approx(infonce_loss(x, y, 10.0).item(), abs=1e-12)   # step 0: one-hot labels
    assert at[4] == pytest.approx(soft_label_nce(x, y, 10.0, 0.2).item(), abs=1e-12)
    assert at[8] == pytest.approx(soft_label_nce(x, y, 10.0, 0.4).item(), abs=1e-12)
    assert set(objective(outputs, None)) == {"contrastive"}                      # no tokens: one term


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_relaxed_matching_is_each_words_best_patch_averaged():
    patches = torch.tensor([[[1.0, 0, 0], [0, 1, 0]],                          # image 0: patches e1, e2
                            [[0, 0, 1.0], [0.6, 0.8, 0]]])                     # image 1: e3, (0.6, 0.8, 0)
    words = torch.tensor([[[1.0, 0, 0], [0, 0, 1], [0, 1, 0]],                 # caption 0: e1, e3, [e2 padding]
                          [[0.8, 0.6, 0], [0, 1, 0], [1, 0, 0]]])              # caption 1: (0.8, 0.6, 0), e2, e1
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # image 0 / caption 0: e1 -> 1, e3 -> 0            mean 0.5
    # image 0 / caption 1: 0.8, 1, 1                   mean 2.8 / 3
    # image 1 / caption 0: e1 -> 0.6, e3 -> 1          mean 0.8
    # image 1 / caption 1: max(0, .48+.48)=.96, max(0, .8)=.8, max(0, .6)=.6   mean 2.36 / 3
    expected = torch.tensor([[0.5, 2.8 / 3], [0.8, 2.36 / 3]])
    scores = relaxed_matching_scores(patches, words, mask)
    torch.testing.assert_close(scores, expected)
    labels = torch.arange(2)
    hand = (F.cross_entropy(5 * expected, labels) + F.cross_entropy(5 * expected.T, labels)) / 2
    torch.testing.assert_close(token_alignment_nce(patches, words, mask, 5.0), hand)


def test_word_positions_and_the_mask_draw():
    built, _, _ = _built()
    tokens = built.tokenizer(CAPTIONS)
    words = word_positions(tokens)
    lengths = (tokens != 0).sum(1)
    assert words.sum(1).tolist() == (lengths - 2).tolist()              # all but the start and end tokens
    assert not words[:, 0].any() and not words[torch.arange(4), lengths - 1].any()
    big = torch.ones(512, 30, dtype=torch.bool)
    draw = mlm_mask(big, 0.15, seed=0, step=7)
    assert 0.13 < draw.float().mean().item() < 0.17
    assert torch.equal(draw, mlm_mask(big, 0.15, seed=0, step=7)) and not torch.equal(draw, mlm_mask(big, 0.15, seed=0, step=8))
    # rank r of 2 draws rows [r B, (r + 1) B) of the one-process draw: data parallelism masks the same words
    halves = [mlm_mask(big[:256], 0.15, seed=0, step=7, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), draw)
    assert not (mlm_mask(words, 0.99, seed=0, step=0) & ~words).any()   # only word positions are masked


def test_mlm_loss_is_cross_entropy_over_the_masked_words_only():
    built, objective, batch = _built()
    model = built.model
    outputs = objective.forward_model(model, batch)
    terms = objective(outputs, batch)
    tokens = batch.tokens[:, :outputs.extras["word_mask"].shape[1]]
    masked = mlm_mask(word_positions(tokens), objective.mask_prob, seed=0, step=batch.step)
    assert masked.any()
    assert torch.equal(outputs.extras["mlm_targets"], tokens[masked])
    with torch.no_grad():   # every position through the fused tower and the head; keep only the masked ones
        x = torch.where(masked[..., None], objective.mask_embedding, model.token_embedding(tokens))
        _, patches = _image_tokens(model.visual, batch.images)                              # (B, P, Wv)
        fused = objective._text_states(model, x, image=objective.image_in(patches))          # (B, T, W)
        logits = objective.mlm_head(fused.flatten(0, 1), model.token_embedding.weight).view(*tokens.shape, -1)
        log_p = torch.log_softmax(logits, dim=-1)
        nll = -log_p.gather(-1, tokens[..., None])[..., 0]                                   # (B, T)
    assert terms["mlm"].item() == pytest.approx(nll[masked].mean().item(), rel=1e-5)
    assert outputs.extras["mlm_logits"].shape[0] == masked.sum() < word_positions(tokens).sum()
    # the masked words are predicted from the image too: another image, other logits
    other = objective.forward_model(model, Batch(images=torch.randn(4, 3, 32, 32), tokens=batch.tokens, step=3))
    assert not torch.allclose(other.extras["mlm_logits"], outputs.extras["mlm_logits"])


def test_gradients_reach_both_towers_and_the_fusion_head():
    built, objective, batch = _built()
    model = built.model
    heads = {"fusion": objective.fusion[0].attn.in_proj_weight, "image_in": objective.image_in.weight,
             "mask_embedding": objective.mask_embedding, "mlm_head": objective.mlm_head.dense.weight}
    towers = {"image": model.visual.conv1.weight, "text": model.transformer.resblocks[0].attn.in_proj_weight}
    for term in ("contrastive", "token", "mlm"):
        model.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        objective(objective.forward_model(model, batch), batch)[term].backward()
        for name, p in towers.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (term, name)
        for name, p in heads.items():   # the head learns from the MLM term only
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (term == "mlm"), (term, name)


def test_the_model_must_have_clips_text_tower():
    with pytest.raises(Exception, match="built-in text transformer"):
        get_loss("lightclip").setup(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="alpha_max"):
        get_loss("lightclip", alpha_max=2)


def test_trainer_trains_the_objectives_head_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    world = ShapesWorld(seed=0, image_size=32, n_objects=(1, 2), split_sizes={"train": 64, "val": 4, "test": 4})
    heads = {}

    def fit(out, **kw):
        built = init_model(CFG, loss="lightclip")
        config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2, log_every=1,
                             out_dir=str(out), loss="lightclip", device="cpu")
        trainer = Trainer(built.model, built.tokenizer, built.preprocess, ShapesTrainSet(world), config,
                          model_cfg=built.model_cfg, progress=False)
        trainer.fit(**kw)

    fit(tmp_path / "a")
    fit(tmp_path / "b", stop_at=2)
    fit(tmp_path / "b", resume=True)
    for run in "ab":
        ckpt = tmp_path / run / "checkpoints"
        weights = load_file(str(ckpt / "step_0000004/open_clip_model.safetensors"))
        heads[run] = torch.load(ckpt / "step_0000004/trainer_state.pt", weights_only=True)["objective"], weights
    (head_a, wa), (head_b, wb) = heads["a"], heads["b"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert head_a.keys() == head_b.keys() and all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    assert not any(k.startswith(("fusion", "mlm_head", "mask_embedding")) for k in wa)   # a plain open_clip model
    first = torch.load(tmp_path / "a/checkpoints/step_0000002/trainer_state.pt", weights_only=True)["objective"]
    assert not torch.equal(first["mask_embedding"], head_a["mask_embedding"])             # the head is trained
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for r in rows[0]:                                  # the three terms are logged and make the loss
        assert r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_token"] + r["loss_mlm"], rel=1e-6)
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_lightclip_trains_from_the_command_line(tmp_path, monkeypatch):
    from cliplab.cli.main import main
    from cliplab.train.recipes import ShapesZeroShot

    monkeypatch.setattr(ShapesZeroShot, "__call__", lambda self, model: {})  # validation is tested elsewhere
    out = tmp_path / "run"
    assert main(["train", "--recipe", "shapes-tiny", "--loss", "lightclip", "--steps", "2", "--batch-size", "8",
                 "--out", str(out), "--log-every", "1", "--eval-every", "1000"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"loss_contrastive", "loss_token", "loss_mlm"} <= set(r) for r in rows)
