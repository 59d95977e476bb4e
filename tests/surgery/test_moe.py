"""CLIP-MoE upcycling: identity with identical experts, top-k routing, the balance loss, reload."""

import json

import numpy as np
import pytest
import torch

import cliplab
from cliplab.errors import UsageError
from cliplab.models.moe import MoEMLP, moe_modules
from cliplab.surgery.moe import (MoEObjective, diversified_multiplet, load_balancing_loss, set_trainable,
                                 train_moe, upcycle)
from cliplab.train import TrainConfig
from cliplab.train.losses import Batch

from _tiny import TEXTS, features, snapshot


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


@pytest.fixture(scope="module")
def train_set():
    """16 (image, captions) items: uint8 (32, 32, 3) images, two captions each."""
    rng = np.random.default_rng(0)
    words = ["red star", "blue square", "green circle", "yellow heart"]
    return [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             [f"a photo of a {words[i % 4]}.", f"a {words[i % 4]}"]) for i in range(16)]


def shake_gates(bb, seed, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mods in moe_modules(bb.model).values():
            for m in mods:
                m.gate.weight.copy_(scale * torch.randn(m.gate.weight.shape, generator=g))


def perturb_experts(bb, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mods in moe_modules(bb.model).values():
            for m in mods:
                for p in m.experts.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("top_k,layers,towers", [(1, None, ("visual", "text")), (2, None, ("visual", "text")),
                                                 (4, None, ("visual", "text")), (2, 1, ("visual",)),
                                                 (1, [0], ("text",))])
def test_identical_experts_equal_the_dense_model_for_any_routing(tiny, images, top_k, layers, towers):
    want = features(tiny, images)
    mb = upcycle(tiny, 4, top_k=top_k, layers=layers, towers=towers)
    for seed in range(3):
        shake_gates(mb, seed)
        for got, ref in zip(features(mb, images), want):
            np.testing.assert_allclose(got, ref, atol=1e-6)
    n_blocks = {"visual": 2, "text": 2}
    expected = {t: (n_blocks[t] if layers is None else (1 if isinstance(layers, int) else len(layers)))
                for t in towers}
    assert {t: len(m) for t, m in moe_modules(mb.model).items()} == expected
    assert not moe_modules(tiny.model)                                   # the input is untouched


def test_top_k_routing_picks_the_largest_gates_and_weights_sum_to_one():
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
               for _ in range(5)]
    m = MoEMLP(experts, 8, top_k=3).eval()
    h = torch.randn(40, 8)
    logits, weights, chosen = m.route(h)
    probs = torch.softmax(logits, -1)
    want = torch.argsort(probs, dim=-1, descending=True)[:, :3]
    assert torch.equal(chosen, want)
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))
    picked = probs.gather(1, chosen)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True))
    dense = torch.stack([e(h) for e in experts], 1)                       # (N, E, W) every expert
    manual = (dense.gather(1, chosen[..., None].expand(-1, -1, 8)) * weights[..., None]).sum(1)
    torch.testing.assert_close(m(h), manual, atol=1e-6, rtol=0)


def test_load_balancing_loss_on_a_hand_made_case():
    # probabilities (0.25, 0.75), (0.8, 0.2), (0.1, 0.9): top-1 picks 1, 0, 1
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.8, 0.2], [0.1, 0.9]]))
    f = np.array([1 / 3, 2 / 3])
    p = np.array([0.25 + 0.8 + 0.1, 0.75 + 0.2 + 0.9]) / 3
    assert load_balancing_loss(logits, top_k=1).item() == pytest.approx(2 * (f * p).sum(), abs=1e-6)
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(2.0, abs=1e-6)  # every token takes both
    assert load_balancing_loss(torch.zeros(10, 4) + torch.arange(10.)[:, None], 2).item() == pytest.approx(2.0)


def test_load_balancing_loss_pools_layers_like_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(30, 6, generator=g) for _ in range(3)]
    z = torch.cat(layers).numpy().astype(np.float64)                      # (N, E)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, 1)[:, :2]
    f = np.stack([(top == e).any(1).mean() for e in range(6)])            # tokens whose top-2 has e
    want = 6 * (f * probs.mean(0)).sum()
    assert load_balancing_loss(layers, 2).item() == pytest.approx(want, rel=1e-5)
    assert load_balancing_loss(torch.stack(layers), 2).item() == pytest.approx(want, rel=1e-5)


def test_reload_gives_identical_outputs(tiny, images, tmp_path):
    mb = upcycle(tiny, 3, top_k=2, layers=[1])
    shake_gates(mb, 0)
    perturb_experts(mb)
    want = features(mb, images)
    for out in (tmp_path / "folder", tmp_path / "model.safetensors"):
        mb.save(out)
        rb = cliplab.load(out)
        assert rb.model_cfg["cliplab"]["moe"] == {"experts": 3, "top_k": 2, "layers": {"visual": [1], "text": [1]}}
        for got, ref in zip(features(rb, images), want):
            np.testing.assert_array_equal(got, ref)
    cfg = json.loads((tmp_path / "folder" / "open_clip_config.json").read_text())
    assert cfg["cliplab"]["moe"]["experts"] == 3


def test_the_objective_adds_the_balance_loss_of_each_tower(tiny):
    mb = upcycle(tiny, 4, top_k=2)
    shake_gates(mb, 3, scale=1.0)
    model = mb.model.train()
    tokens = mb.tokenize(TEXTS)
    batch = Batch(images=torch.randn(3, 3, 32, 32), tokens=tokens)
    obj = MoEObjective(aux_weight=0.5)
    out = obj.forward_model(model, batch)
    blocks = moe_modules(model)
    # recompute the per-tower loss from the gates' inputs, captured by hooks
    seen = {t: [] for t in blocks}
    hooks = [m.gate.register_forward_hook(lambda mod, inp, o, t=t: seen[t].append(o))
             for t, mods in blocks.items() for m in mods]
    obj.forward_model(model, batch)
    for hk in hooks:
        hk.remove()
    terms = obj(out, batch)
    want = {t: load_balancing_loss(seen[t], 2) for t in blocks}
    for t in blocks:
        torch.testing.assert_close(out.extras[f"balance_{t}"], want[t])
    torch.testing.assert_close(terms["balance"], 0.5 * (want["visual"] + want["text"]))
    assert all(not m.router_logits for mods in blocks.values() for m in mods)  # nothing kept between steps
    model(batch.images, batch.tokens)  # trained by another objective: nothing recorded, no graph kept
    assert all(not m.router_logits and not m.record_router_logits for mods in blocks.values() for m in mods)


def test_train_moe_trains_routers_and_experts_only_and_checkpoints_reload(tiny, train_set, tmp_path):
    mb = upcycle(tiny, 2, top_k=1, layers=1)
    before = snapshot(mb.model)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, ckpt_every=0, log_every=1,
                      out_dir=str(tmp_path))
    trained = train_moe(mb, train_set, cfg)
    after = snapshot(trained.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.experts." in k or ".mlp.gate." in k for k in changed)
    assert any(".mlp.gate." in k for k in changed)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_balance"] > 0
    ckpt = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    rb = cliplab.load(ckpt)
    np.testing.assert_array_equal(rb.encode_texts(TEXTS), trained.encode_texts(TEXTS))
    assert set_trainable(trained.model, "router") is trained.model
    assert {n for n, p in trained.model.named_parameters() if p.requires_grad} == {
        "visual.transformer.resblocks.1.mlp.gate.weight", "transformer.resblocks.1.mlp.gate.weight"}


def test_diversified_multiplet_makes_experts_from_cluster_finetuned_mlps(tiny, train_set, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, ckpt_every=0, out_dir=str(tmp_path))
    mp = diversified_multiplet(tiny, train_set, cfg, experts=2, n_samples=16, layers=[1])
    assert len(mp.experts) == 2 and sorted(np.unique(mp.labels)) == [0, 1] and len(mp.indices) == 16
    base = snapshot(tiny.model)
    for member in mp.experts:
        changed = {k for k, v in snapshot(member.model).items() if not torch.equal(v, base[k])}
        assert changed and all(".resblocks.1.mlp." in k for k in changed)   # only the chosen MLPs moved
    mb = upcycle(tiny, mp.experts, top_k=1, layers=[1])
    for tower, mods in moe_modules(mb.model).items():
        for e, member in enumerate(mp.experts):
            src = (member.model.visual.transformer if tower == "visual" else member.model.transformer).resblocks[1].mlp
            for (_, want), (_, got) in zip(src.state_dict().items(), mods[0].experts[e].state_dict().items()):
                torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_errors(tiny):
    with pytest.raises(UsageError, match="top_k"):
        upcycle(tiny, 2, top_k=3)
    with pytest.raises(UsageError, match="blocks"):
        upcycle(tiny, 2, layers=[5])
    with pytest.raises(UsageError, match="already"):
        upcycle(upcycle(tiny, 2), 2)
    with pytest.raises(UsageError, match="no mixture"):
        train_moe(tiny, [], TrainConfig(out_dir="x"))
    with pytest.raises(cliplab.errors.ModelLoadError, match="MoE layout"):
        from cliplab.models.loading import build_model
        from _tiny import TINY_CFG

        build_model({**TINY_CFG, "cliplab": {"moe": {"experts": 2}}})
