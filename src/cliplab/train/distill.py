"""Distillation from a live, frozen teacher: DCLIP and DC-CLIP as Trainer objectives.

The objectives hold a teacher (a :class:`~cliplab.models.backbone.Backbone` or an
open_clip model), frozen (``requires_grad=False``, eval mode), and run it on every batch
inside ``forward_model``; the Trainer trains the student only.  The student's batch is
re-normalised and resized for the teacher when their preprocessing differs.

DCLIP (Csizmadia et al., arXiv:2505.21549)
------------------------------------------
Student towers distilled from a teacher's embeddings with a contrastive and a feature
loss on both modalities (numbered as in the code below; x, y student image and text
features, u, v the teacher's, all L2-normalised; t, s the student's and teacher's
temperatures)::

    (InfoNCE) L_clip = 1/2 [CE(t X Y^T, I) + CE(t Y X^T, I)]
    (F)       L_feat = mean_i (1 - cos(x_i, u_i)) + mean_i (1 - cos(y_i, v_i))
    (KD)      L_kd   = 1/2 [KL(softmax(s U V^T / T) || softmax(t X Y^T / T)) + the same for the columns]
    (L)       L = w_clip L_clip + w_feat L_feat + w_kd L_kd

Defaults w_clip = w_feat = 1 (the paper's alpha and beta are not published), w_kd = 1,
T = 1 (the contrastive-relation term of CLIP-KD).  Deviation: the paper's teacher is a
cross-modal transformer over YOLO region crops and caption tokens producing enriched
embeddings; here the teacher is any CLIP Backbone (its own embeddings are the targets),
since no such transformer or detector is available; its code was not published.

DC-CLIP (Zhang et al., Pattern Recognition 2025, arXiv:2404.11249)
------------------------------------------------------------------
A lightweight multilingual student in two stages:

- stage 1, feature distillation (:class:`DCCLIPStage1`): the student image tower regresses
  the teacher image tower's features, and the student text tower regresses the teacher
  text tower's features of the *parallel* caption in the teacher's language, from both the
  foreign (Chinese) and the teacher-language caption::

      (S1) L = w_img SmoothL1(x, u) + w_txt 1/2 [SmoothL1(y_zh, v_en) + SmoothL1(y_en, v_en)]

  with SmoothL1 summed over the feature dimension and averaged over the batch (beta = 1;
  on unit vectors it is 1/2 |x - u|^2 = 1 - cos);
- stage 2, alignment: CLIP's symmetric InfoNCE on bilingual image-text pairs (the
  ``infonce`` objective on :class:`~cliplab.train.datasets.ShapesTrainSet` with
  ``languages=("en", "zh")``).

Deviations: the paper regresses intermediate feature maps through 1x1 adapters; here
the final (projected) embeddings are regressed, so no adapter is needed when the student
keeps the teacher's embedding width (an optional linear projector otherwise).  The
paper's teacher is AltCLIP; here any CLIP Backbone (shapes-tiny on ShapesWorld).  No
reference code is public; the tests check the closed forms.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .losses.base import Batch, ModelOutputs, Objective
from .losses.infonce import infonce_loss

logger = logging.getLogger(__name__)

__all__ = ["DCCLIPStage1", "DCLIPObjective", "cosine_distance", "feature_smooth_l1", "similarity_kd"]

_EOT = 49407  # CLIP BPE end-of-text id: the token a truncated sequence must end with


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i (1 - cos(student_i, teacher_i))`` of eq. (F) for (N, D) features."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def feature_smooth_l1(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """SmoothL1 of eq. (S1): summed over the D features, averaged over the N rows."""
    return F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).sum(-1).mean()


def similarity_kd(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                  teacher_image: torch.Tensor, teacher_text: torch.Tensor, teacher_scale,
                  temperature: float = 1.0) -> torch.Tensor:
    """Eq. (KD): KL from the teacher's to the student's image-text softmax, rows and columns averaged.

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        The student's, L2-normalised.
    logit_scale : torch.Tensor or float
        The student temperature t.
    teacher_image, teacher_text : torch.Tensor of shape (N, D_t)
        The teacher's, L2-normalised.
    teacher_scale : torch.Tensor or float
        The teacher temperature s.
    temperature : float, default 1.0
        The distillation temperature T (no T^2 factor).

    Returns
    -------
    torch.Tensor
        A scalar, 0 when the student's logits equal the teacher's.
    """
    z_s = logit_scale * image_features @ text_features.T / temperature                    # (N, N)
    z_t = teacher_scale * teacher_image @ teacher_text.T / temperature                    # (N, N)

    def kl(t, s):
        return (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1).mean()

    return (kl(z_t, z_s) + kl(z_t.T, z_s.T)) / 2


class _TeacherObjective(Objective):
    """An objective holding a frozen teacher CLIP and running it on the student's batch.

    Parameters
    ----------
    teacher : Backbone or open_clip.CLIP
        Frozen here (``requires_grad=False``, eval mode); its weights never change.
    preprocess_cfg : dict, optional
        The student's ``size``/``mean``/``std`` (the Trainer's ``preprocess_cfg``);
        needed only when they differ from the teacher's.
    student_dim : int, optional
        The student's embedding width when it differs from the teacher's: a linear
        projector (trained, not saved in the student's checkpoints) maps the student's
        features to the teacher's width for the distillation terms.
    """

    frozen_modules = ("teacher",)  # rebuilt by every run: not in checkpoints

    def __init__(self, teacher, *, preprocess_cfg: dict | None = None, student_dim: int | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        model = getattr(teacher, "model", teacher)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.teacher = model
        self.teacher_cfg = _preprocess_cfg(teacher)
        self.student_cfg = preprocess_cfg
        t_dim = int(model.text_projection.shape[1]) if isinstance(getattr(model, "text_projection", None),
                                                                   torch.Tensor) else None
        self.proj_image = self.proj_text = None
        if student_dim is not None and t_dim is not None and int(student_dim) != t_dim:
            self.proj_image = torch.nn.Linear(int(student_dim), t_dim, bias=False)
            self.proj_text = torch.nn.Linear(int(student_dim), t_dim, bias=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def parameter_groups(self, model, weight_decay):
        """The Trainer's groups for the student, plus the projectors (when there are any)."""
        if self.proj_image is None:
            return None
        from .trainer import parameter_groups

        groups = parameter_groups(model, weight_decay)
        groups[1]["params"] = groups[1]["params"] + [self.proj_image.weight, self.proj_text.weight]
        return groups

    def project(self, features: torch.Tensor, which: str) -> torch.Tensor:
        """Student features in the teacher's width, L2-normalised."""
        proj = self.proj_image if which == "image" else self.proj_text
        return features if proj is None else F.normalize(proj(features), dim=-1)

    @torch.no_grad()
    def teacher_images(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, D_t) features of the student's (B, 3, H, W) batch."""
        return self.teacher.encode_image(self._for_teacher(images), normalize=True)

    @torch.no_grad()
    def teacher_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, D_t) features of (B, T) CLIP-BPE tokens (cut or padded to its context)."""
        ctx = int(self.teacher.context_length)
        if tokens.shape[1] > ctx:
            cut = tokens[:, ctx:].ne(0).any(1)                                           # (B,)
            tokens = tokens[:, :ctx].clone()
            tokens[cut, -1] = _EOT
        elif tokens.shape[1] < ctx:
            tokens = F.pad(tokens, (0, ctx - tokens.shape[1]))
        return self.teacher.encode_text(tokens, normalize=True)

    def _for_teacher(self, x: torch.Tensor) -> torch.Tensor:
        s, t = self.student_cfg, self.teacher_cfg
        if s is None or t is None:
            return x
        size = _pair(t.get("size"))
        if (_pair(s.get("size")) == size and list(s.get("mean", [])) == list(t.get("mean", []))
                and list(s.get("std", [])) == list(t.get("std", []))):
            return x

        def stat(cfg, key):
            return torch.tensor(cfg[key], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

        raw = x * stat(s, "std") + stat(s, "mean")                                       # pixels in [0, 1]
        if size and list(raw.shape[-2:]) != size:
            raw = F.interpolate(raw, size=tuple(size), mode="bicubic", align_corners=False)
        return (raw - stat(t, "mean")) / stat(t, "std")

    def teacher_scale(self) -> torch.Tensor:
        return self.teacher.logit_scale.exp().detach()


def _pair(size) -> list | None:
    if size is None:
        return None
    return [int(v) for v in size] if isinstance(size, (list, tuple)) else [int(size)] * 2


def _preprocess_cfg(teacher) -> dict | None:
    cfg = getattr(teacher, "preprocess_cfg", None)
    if cfg is None:
        try:
            from open_clip import get_model_preprocess_cfg

            cfg = get_model_preprocess_cfg(teacher)
        except (AttributeError, ImportError):
            return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()} or None


class DCLIPObjective(_TeacherObjective):
    """DCLIP: InfoNCE plus feature and similarity distillation from a frozen teacher (eq. L).

    Items are the usual ``(image, captions)``; the teacher sees the same image and the
    same caption.

    Parameters
    ----------
    teacher : Backbone or open_clip.CLIP
    clip_weight, feature_weight, kd_weight : float, default 1.0
        w_clip, w_feat, w_kd of eq. (L).
    temperature : float, default 1.0
        T of eq. (KD).
    preprocess_cfg, student_dim
        As the base class (see the module docstring).

    Examples
    --------
    >>> obj = DCLIPObjective(cliplab.load("shapes-tiny"))                      # doctest: +SKIP
    >>> Trainer(student, tok, pre, train_set, config, objective=obj).fit()    # doctest: +SKIP
    """

    name = "dclip"

    def __init__(self, teacher, *, clip_weight: float = 1.0, feature_weight: float = 1.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, **kwargs):
        super().__init__(teacher, **kwargs)
        self.clip_weight, self.feature_weight, self.kd_weight = float(clip_weight), float(feature_weight), float(kd_weight)
        self.temperature = float(temperature)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """The student's outputs; the teacher's features in ``extras["teacher_image"/"teacher_text"]``."""
        out = super().forward_model(model, batch)
        out.extras["teacher_image"] = self.teacher_images(batch.images)                  # (B, D_t)
        out.extras["teacher_text"] = self.teacher_texts(batch.tokens)                    # (B, D_t)
        out.extras["teacher_scale"] = self.teacher_scale()
        return out

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """``{"contrastive": w_clip L_clip, "feature": w_feat L_feat, "kd": w_kd L_kd}`` (eq. L)."""
        img, txt, t = outputs.image_features, outputs.text_features, outputs.logit_scale
        u, v = outputs.extras["teacher_image"], outputs.extras["teacher_text"]
        pi, pt = self.project(img, "image"), self.project(txt, "text")
        return {"contrastive": self.clip_weight * infonce_loss(img, txt, t),                           # (InfoNCE)
                "feature": self.feature_weight * (cosine_distance(pi, u) + cosine_distance(pt, v)),    # eq. (F)
                "kd": self.kd_weight * similarity_kd(pi, pt, t, u, v, outputs.extras["teacher_scale"],
                                                     self.temperature)}                                 # eq. (KD)


class DCCLIPStage1(_TeacherObjective):
    """DC-CLIP stage 1: feature distillation of both towers on parallel captions (eq. S1).

    Items are ``(image, [captions in the student's new language], {"extra_captions":
    [the parallel caption in the teacher's language]})``, as
    ``ShapesTrainSet(world, languages=("zh",), parallel=True)`` makes them.

    Parameters
    ----------
    teacher : Backbone or open_clip.CLIP
    image_weight, text_weight : float, default 1.0
        w_img, w_txt of eq. (S1).
    beta : float, default 1.0
        SmoothL1's beta.
    preprocess_cfg, student_dim
        As the base class.
    """

    name = "dcclip-stage1"
    needs_extra_captions = True

    def __init__(self, teacher, *, image_weight: float = 1.0, text_weight: float = 1.0, beta: float = 1.0, **kwargs):
        super().__init__(teacher, **kwargs)
        self.image_weight, self.text_weight, self.beta = float(image_weight), float(text_weight), float(beta)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """Student features of the image, the caption and the parallel caption; the teacher's of the image
        and the parallel caption (``extras``)."""
        out = super().forward_model(model, batch)
        out.extras["teacher_image"] = self.teacher_images(batch.images)                  # (B, D_t)
        out.extras["teacher_text"] = self.teacher_texts(batch.extra_tokens[:, 0])        # (B, D_t)
        return out

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """``{"image": w_img SmoothL1(x, u), "text": w_txt (SmoothL1(y, v) + SmoothL1(y_par, v)) / 2}`` (eq. S1)."""
        u, v = outputs.extras["teacher_image"], outputs.extras["teacher_text"]
        x = self.project(outputs.image_features, "image")
        y = self.project(outputs.text_features, "text")
        y_par = self.project(outputs.extra_text_features[:, 0], "text")
        return {"image": self.image_weight * feature_smooth_l1(x, u, self.beta),
                "text": self.text_weight * (feature_smooth_l1(y, v, self.beta)
                                            + feature_smooth_l1(y_par, v, self.beta)) / 2}        # eq. (S1)
