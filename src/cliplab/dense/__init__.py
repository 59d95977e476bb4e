"""Dense and fine-grained CLIP methods: patch- and token-level scores.

- :mod:`.misalignment`: CLIPScore, RefCLIPScore, CLIP4DM word attribution and F-CLIPScore;
- :mod:`.anomaly`: zero- and few-shot anomaly maps (the ``anomaly method`` registry).
"""
