"""Few-shot adapters on image features: scikit-learn classifiers on (N, D) float32 features.

=============  ==================  ====================================================
name (CLI)     class               method
=============  ==================  ====================================================
``linear``     :class:`LinearProbe`  logistic regression, C chosen on validation
``gda``        :class:`GDA`          Gaussian discriminant analysis + zero-shot (ICLR'24)
``tip``        :class:`TipAdapter`   training-free feature cache + zero-shot (ECCV'22)
``tip-f``      :class:`TipAdapterF`  Tip-Adapter with fine-tuned cache keys
``caps``       :class:`CapSAdapter`  image + caption cache with KL term (arXiv:2405.16591)
=============  ==================  ====================================================

Every adapter chooses its hyper-parameters on a validation split (``fit(X, y, X_val,
y_val)``, or carved from ``X``), never on test.  ``save_adapter`` / ``load_adapter``
write and read a fitted adapter (JSON + safetensors).
"""

from .caps import CapSAdapter
from .gda import GDA
from .io import load_adapter, save_adapter
from .linear import LinearProbe
from .tip import TipAdapter, TipAdapterF

__all__ = ["LinearProbe", "GDA", "TipAdapter", "TipAdapterF", "CapSAdapter", "save_adapter",
           "load_adapter", "ADAPTERS"]

#: CLI name -> adapter class.
ADAPTERS = {"linear": LinearProbe, "gda": GDA, "tip": TipAdapter, "tip-f": TipAdapterF,
            "caps": CapSAdapter}
