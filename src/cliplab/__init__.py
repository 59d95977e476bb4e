"""cliplab: one toolkit for CLIP-style image-text models.

>>> import cliplab
>>> bb = cliplab.load("shapes-tiny")                                       # doctest: +SKIP
>>> clf = cliplab.ZeroShotClassifier(bb, ["red star", "blue circle"])      # doctest: +SKIP
"""

from .errors import BadImage, CliplabError, ModelLoadError, OfflineError, UnsafeCheckpoint
from .models.backbone import Backbone
from .models.loading import load
from .zeroshot import ZeroShotClassifier

__version__ = "0.1.0"

__all__ = ["load", "Backbone", "ZeroShotClassifier", "CliplabError", "BadImage",
           "ModelLoadError", "OfflineError", "UnsafeCheckpoint", "__version__"]
