"""A tiny random-init CLIP config for fast tests."""

import torch

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_model(cfg=TINY_CFG, seed=0, **overrides):
    from cliplab.models.loading import build_model

    torch.manual_seed(seed)
    return build_model({**cfg, **overrides})


# Shared by the surgery tests: prompts, features of a Backbone, a copy of its weights.
TEXTS = ["a photo of a red star.", "two blue squares on a striped background", "a circle"]


def features(bb, images):
    return bb.encode_images(images).features, bb.encode_texts(TEXTS)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
