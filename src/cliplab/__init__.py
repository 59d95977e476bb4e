"""cliplab: one toolkit for CLIP-style image-text models.

>>> import cliplab
>>> bb = cliplab.load("shapes-tiny")                                       # doctest: +SKIP
>>> clf = cliplab.ZeroShotClassifier(bb, ["red star", "blue circle"])      # doctest: +SKIP

``import cliplab`` is cheap: the public names of the modules that need torch and open_clip
are imported on first use (:mod:`cliplab.lazy`).
"""

from .errors import BadImage, CliplabError, ModelLoadError, OfflineError, UnsafeCheckpoint
from .lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, _lazy = lazy_exports(__name__, {
    ".models.loading": ["load"],
    ".models.backbone": ["Backbone"],
    ".zeroshot": ["ZeroShotClassifier"],
})

__all__ = [*_lazy, "CliplabError", "BadImage", "ModelLoadError", "OfflineError", "UnsafeCheckpoint",
           "__version__"]
