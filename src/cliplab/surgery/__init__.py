"""Model surgery: functions that take a Backbone and return a new, modified one."""

from .layers import trainable_parameters
from .lora import apply_lora, load_lora, lora_state_dict, merge_lora, save_lora, unmerge_lora
from .svd import apply_svd
from .wise_ft import interpolate, interpolate_state_dicts, sweep as wise_ft_sweep

__all__ = ["apply_lora", "merge_lora", "unmerge_lora", "lora_state_dict", "save_lora",
           "load_lora", "apply_svd", "trainable_parameters", "interpolate",
           "interpolate_state_dicts", "wise_ft_sweep"]
