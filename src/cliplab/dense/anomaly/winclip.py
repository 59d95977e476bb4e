"""WinCLIP and WinCLIP+: zero- and few-shot anomaly classification and segmentation.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023,
arXiv:2303.14814.  Reference re-implementation: zqhang/WinCLIP-pytorch ``reproduce_WinCLIP.py``.

Zero-shot (WinCLIP):

1. Compositional prompt ensemble (section 4.1): 7 normal and 4 anomalous state words x 22
   templates; the text embedding of each class is the mean of its normalised prompt
   embeddings.  The score of an embedding f is softmax([cos(f, t_n), cos(f, t_a)] / 0.07)[a].
2. Window embeddings (section 4.2): for every k x k window of patches (k = 2 and 3, stride
   1) only the class token and the window's patch tokens go through the vision
   transformer; the pooled output is the window's embedding.
3. Harmonic aggregation: a patch's score at scale k is the harmonic mean of the scores of
   the windows that cover it; the zero-shot map is the harmonic mean of the two scale maps
   and the image score z (``3 / (1/M_2 + 1/M_3 + 1/z)``), upsampled bilinearly to the
   input size.  The image score is z, the score of the whole image's embedding.

Few-shot (WinCLIP+, section 4.3): the window embeddings of the K normal reference images
form a memory per scale, and their patch tokens a patch-level memory; a window's (patch's)
score is ``1/2 min_m (1 - cos(f, m))``; window scores are aggregated to patches as above and
the three maps (patch, 2 x 2, 3 x 3) averaged.  The map is the mean of the zero-shot and the
few-shot maps; the image score is the mean of z and the maximum of the few-shot map.

Deviations: the patch-level memory holds last-layer tokens (the paper: penultimate layer);
no Gaussian smoothing; windows always of 2 and 3 patches whatever the model's grid (the paper
uses the same two on a 15 x 15 grid).
"""

from __future__ import annotations

import numpy as np

from . import ANOMALY_METHODS, AnomalyMethod, AnomalyResult

__all__ = ["WinCLIP", "WinCLIPPlus", "TEMPLATES", "NORMAL_STATES", "ANOMALOUS_STATES", "window_indices"]

#: The 22 templates of WinCLIP's compositional prompt ensemble (paper Fig. 6).
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.", "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)
#: State words: 7 normal, 4 anomalous.
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
SCALES = (2, 3)
TEMPERATURE = 0.07


def window_indices(grid: int, k: int) -> np.ndarray:
    """Patch indices (row-major) of every k x k window of a grid x grid patch grid, stride 1: (W, k*k)."""
    r = np.arange(grid - k + 1)
    top_left = (r[:, None] * grid + r[None, :]).ravel()                   # (W,)
    offsets = (np.arange(k)[:, None] * grid + np.arange(k)[None, :]).ravel()
    return top_left[:, None] + offsets[None, :]


def harmonic_patch_map(window_scores: np.ndarray, windows: np.ndarray, n_patches: int) -> np.ndarray:
    """Per patch, the harmonic mean of the scores of the windows covering it: (N, W) -> (N, P)."""
    inv = np.zeros((len(window_scores), n_patches))
    count = np.bincount(windows.ravel(), minlength=n_patches)               # windows per patch
    for j in range(windows.shape[1]):
        np.add.at(inv.T, windows[:, j], (1.0 / np.maximum(window_scores, 1e-12)).T)
    return count / inv


class WinCLIP(AnomalyMethod):
    """WinCLIP zero-shot anomaly classification and segmentation (module docstring).

    Parameters
    ----------
    backbone : Backbone
        An open_clip vision transformer (class-token or average pooling, no attention pool).
    category : str, default="object"
        The object name in the prompts.
    batch_size : int, default=32
        Images per forward pass.
    """

    def __init__(self, backbone, *, category: str = "object", batch_size: int = 32):
        super().__init__(backbone, category=category, batch_size=batch_size)
        self._text = None

    # -- text side
    def text_embeddings(self) -> np.ndarray:
        """(2, D): the normalised mean embeddings of the normal and the anomalous prompts."""
        if self._text is None:
            out = []
            for states in (NORMAL_STATES, ANOMALOUS_STATES):
                prompts = [t.format(s.format(self.category)) for s in states for t in TEMPLATES]
                e = self.backbone.encode_texts(prompts, progress=False).mean(axis=0)
                out.append(e / np.linalg.norm(e))
            self._text = np.stack(out).astype(np.float32)
        return self._text

    def _anomaly_prob(self, feats: np.ndarray) -> np.ndarray:
        logits = feats @ self.text_embeddings().T / TEMPERATURE             # (..., 2)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        return p[..., 1] / p.sum(axis=-1)

    # -- vision side
    def embeddings(self, images) -> tuple[np.ndarray, dict[int, np.ndarray], int]:
        """Image embeddings (N, D), window embeddings {k: (N, W_k, D)} and the patch grid side.

        Key 1 of the windows holds the last layer's patch tokens (N, P, W), normalised (for
        WinCLIP+'s patch-level memory).
        """
        import torch
        import torch.nn.functional as F

        visual = self.backbone.model.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "_embeds"):
            from ...errors import UsageError

            raise UsageError("WinCLIP needs an open_clip VisionTransformer without attention pooling")
        images = list(images)
        whole, windows, grid = [], {k: [] for k in (1, *SCALES)}, None
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = self._pixels(images[start:start + self.batch_size]).to(self.backbone._dtype)
                tokens = visual._embeds(x)                                     # (B, 1 + P, W)
                B, n, W = tokens.shape
                grid = int(round((n - 1) ** 0.5))
                out = visual.transformer(tokens)                                # (B, 1 + P, W)
                whole.append(self._pool(visual, out))
                windows[1].append(F.normalize(out[:, 1:].float(), dim=-1).cpu().numpy())
                for k in SCALES:
                    idx = torch.as_tensor(window_indices(grid, k) + 1, device=tokens.device)   # (Wk, k*k)
                    cls = tokens[:, :1].unsqueeze(1).expand(B, len(idx), 1, W)
                    seq = torch.cat([cls, tokens[:, idx]], dim=2).reshape(B * len(idx), 1 + k * k, W)
                    windows[k].append(self._pool(visual, visual.transformer(seq)).reshape(B, len(idx), -1))
        return (np.concatenate(whole), {k: np.concatenate(v) for k, v in windows.items()}, grid)

    @staticmethod
    def _pool(visual, x):
        import torch.nn.functional as F

        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    def _upsample(self, patch_maps: np.ndarray, grid: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        size = self.backbone.image_size
        m = torch.from_numpy(patch_maps.reshape(-1, 1, grid, grid).astype(np.float32))
        return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()

    def _zero_shot(self, whole, windows, grid):
        z = self._anomaly_prob(whole)                                        # (N,)
        inv = 1.0 / np.maximum(z, 1e-12)[:, None]                            # (N, 1)
        for k in SCALES:
            scores = self._anomaly_prob(windows[k])                           # (N, W_k)
            inv = inv + 1.0 / np.maximum(harmonic_patch_map(scores, window_indices(grid, k), grid * grid), 1e-12)
        return z, (len(SCALES) + 1) / inv                                    # (N,), (N, P)

    def predict(self, images) -> AnomalyResult:
        """Image scores (N,) and maps (N, S, S) of ``images``."""
        whole, windows, grid = self.embeddings(images)
        z, patch = self._zero_shot(whole, windows, grid)
        return AnomalyResult(z.astype(np.float32), self._upsample(patch, grid))


class WinCLIPPlus(WinCLIP):
    """WinCLIP+: WinCLIP with a memory of normal reference windows (few-shot; module docstring).

    Parameters
    ----------
    backbone, category, batch_size
        As :class:`WinCLIP`.
    """

    needs_references = True

    def fit(self, normal_images) -> "WinCLIPPlus":
        """Store the window embeddings of the normal reference images (K >= 1)."""
        normal_images = list(normal_images)
        if not normal_images:
            from ...errors import UsageError

            raise UsageError("WinCLIP+ needs at least one normal reference image (--shots >= 1)")
        _, windows, grid = self.embeddings(normal_images)
        self.memory_ = {k: v.reshape(-1, v.shape[-1]) for k, v in windows.items()}   # (K * W_k, D)
        self.grid_ = grid
        return self

    def predict(self, images) -> AnomalyResult:
        if not hasattr(self, "memory_"):
            from ...errors import UsageError

            raise UsageError("WinCLIP+ is not fitted: call fit(normal_images) first")
        whole, windows, grid = self.embeddings(images)
        z, zero_shot = self._zero_shot(whole, windows, grid)
        few = np.zeros_like(zero_shot)
        for k in (1, *SCALES):
            dist = 0.5 * (1 - (windows[k] @ self.memory_[k].T).max(axis=-1))      # (N, W_k)
            dist = np.maximum(dist, 1e-12)                                         # cos <= 1 up to rounding
            few += dist if k == 1 else harmonic_patch_map(dist, window_indices(grid, k), grid * grid)
        few /= 1 + len(SCALES)
        patch = 0.5 * (zero_shot + few)
        score = 0.5 * (z + few.max(axis=1))
        return AnomalyResult(score.astype(np.float32), self._upsample(patch, grid))


ANOMALY_METHODS.register("winclip", help="WinCLIP zero-shot: prompt ensemble, 2x2 and 3x3 windows, "
                         "harmonic aggregation (Jeong et al. 2023)")(WinCLIP)
ANOMALY_METHODS.register("winclip+", help="WinCLIP+ few-shot: WinCLIP plus nearest normal reference windows "
                         "(--shots K)")(WinCLIPPlus)
