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
    ".captioner": ["CAPTION_HEADS", "CaptionHead", "CaptionObjective", "Captioner", "attribute_accuracy",
                  "caption_latency", "cider", "head_size", "load_captioner", "parse_caption", "train_captioner"],
    ".lightcap": ["ConceptExtractor", "LightCap"],
    ".rave": ["EnhancementNet", "enhance", "image_quality", "load_enhancer", "residual_vector", "save_enhancer",
             "train_rave"],
    ".softpromptcomp": ["SoftPromptComp", "train_softpromptcomp", "load_softpromptcomp"],
    ".capsulator": ["Capsulator"],
    ".vladva": ["train_vladva", "save_vladva", "load_vladva", "VladVAObjective", "VladVAModel", "VladVASet"],
    ".generator": ["ConditionalGenerator", "TinyUNet", "train_generator", "sample", "shapes_images"],
    ".diva": ["diva"],
    ".un2clip": ["un2clip"],
})
