"""Model surgery: functions that take a Backbone and return a new, modified one.

The names below are imported on first use (:mod:`cliplab.lazy`).
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".lora": ["apply_lora", "merge_lora", "unmerge_lora", "lora_state_dict", "save_lora", "load_lora"],
    ".svd": ["apply_svd"],
    ".layers": ["trainable_parameters"],
    ".wise_ft": ["interpolate", "interpolate_state_dicts"],
    ".outlier_free": ["apply_outlier_free", "clipped_softmax", "OutlierFreeAttention"],
    ".quantize": ["quantize_w8a8", "outlier_stats", "OutlierStats"],
    ".long_positions": ["stretch_positions", "stretch_position_table"],
    ".longclip": ["finetune_longclip", "LongCaptionSet", "LongCLIPLoss"],
    ".moe": ["upcycle", "diversified_multiplet", "train_moe", "finetune_mlp", "load_balancing_loss",
             "MoEObjective"],
})
