"""Resilience to hardware faults: bit-flip fault injection and ProAct's bounded activations.

- :mod:`.faults`: random bit flips in weights (float32 or int8 storage) at a bit-error
  rate, seeded, counted, and fault campaigns over many trials;
- :mod:`.proact`: hybrid clipped activations (layer-wise thresholds, neuron-wise in the last
  layer) trained progressively through the Trainer.

The names below are imported on first use (:mod:`cliplab.lazy`).
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".faults": ["flip_bits", "inject_faults", "fault_campaign", "weight_tensors", "FaultReport", "FORMATS"],
    ".proact": ["HybridClippedActivation", "apply_proact", "train_proact", "bounded_layers"],
})
