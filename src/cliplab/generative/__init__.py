"""Generative heads on CLIP and compression of what goes into it.

- captioning: a small text decoder over Backbone image tokens, LightCap's concept
  extractor, and VladVA's joint contrastive + next-token training;
- generative feedback: a small conditional generator on CLIP visual features, and DIVA /
  un²CLIP, which fine-tune the visual tower through the frozen generator;
- RAVE: a residual CLIP direction (well-lit minus backlit) guiding an enhancement network;
- long-text compression: SoftPromptComp (soft tokens) and Nano-Capsulator (short text).

The names below are imported on first use (:mod:`cliplab.lazy`).
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".generator": ["ConditionalGenerator", "TinyUNet", "train_generator", "sample", "shapes_images"],
    ".diva": ["diva"],
    ".un2clip": ["un2clip"],
})
