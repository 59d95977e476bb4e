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

Learners train by gradient descent (:mod:`cliplab.adapt._trainable`); prompt learners
take the frozen image features, fine-tuners take images:

=============  ======================  ===============================================
``coop``       :class:`CoOp`             learnable prompt context (IJCV'22)
``kgcoop``     :class:`KgCoOp`           CoOp kept near the hand-written prompt (CVPR'23)
``mocoop``     :class:`MoCoOp`           mixture of soft prompts with a router (arXiv:2409.12011)
``lora``       :class:`LoRAClassifier`   LoRA on both towers (images in)
``svd``        :class:`SVDClassifier`    CLIP-SVD: singular values only (images in)
``full``       :class:`FullFineTune`     every weight (images in; the WiSE-FT endpoint)
=============  ======================  ===============================================

Every adapter chooses its hyper-parameters on a validation split (``fit(X, y, X_val,
y_val)``, or carved from ``X``), never on test.  ``save_adapter`` / ``load_adapter``
write and read a fitted adapter (JSON + safetensors).
"""

from .caps import CapSAdapter
from .coop import CoOp, KgCoOp
from .finetune import FullFineTune, LoRAClassifier, SVDClassifier
from .mocoop import MoCoOp
from .gda import GDA
from .io import load_adapter, save_adapter
from .linear import LinearProbe
from .tip import TipAdapter, TipAdapterF

__all__ = ["LinearProbe", "GDA", "TipAdapter", "TipAdapterF", "CapSAdapter", "CoOp", "KgCoOp", "MoCoOp",
           "LoRAClassifier", "SVDClassifier", "FullFineTune", "save_adapter", "load_adapter", "ADAPTERS",
           "LEARNERS"]

#: CLI name -> adapter class.
ADAPTERS = {"linear": LinearProbe, "gda": GDA, "tip": TipAdapter, "tip-f": TipAdapterF,
            "caps": CapSAdapter}

#: CLI name -> learner class (trained by gradient descent).
LEARNERS = {"coop": CoOp, "kgcoop": KgCoOp, "mocoop": MoCoOp, "lora": LoRAClassifier, "svd": SVDClassifier,
            "full": FullFineTune}
