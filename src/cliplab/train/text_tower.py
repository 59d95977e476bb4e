"""A language-model text tower for CLIP: LLM2CLIP and ProCLIP training.

Both methods pair a CLIP image tower with a frozen text embedder (here a
sentence-transformers encoder, :class:`~cliplab.models.sentence.SentenceBackbone`) followed
by a trainable adapter into the joint space; they differ in how the adapter and the
image tower learn.  Both run through the one :class:`~cliplab.train.Trainer`.

LLM2CLIP
--------
"LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation", Huang et al.,
AAAI 2026, arXiv:2411.04997; reference ``microsoft/LLM2CLIP`` (``llm2clip/eva_clip/model.py``
``TextProj``, ``llm2clip/run.sh``).  The embedder is frozen (its caption embeddings are
precomputed in the reference); the adapter ``TextProj`` (L2-normalise, 4 residual blocks
``x + MLP(LN(x))`` with expansion 2, LN, Linear) and the pretrained image tower are
trained from the start with CLIP's symmetric InfoNCE, the temperature learnable.

ProCLIP
-------
"ProCLIP: Progressive Vision-Language Alignment via LLM-based Embedder", Hu et al.,
arXiv:2510.18795; reference ``VisionXLab/ProCLIP`` (``training/train.py``
``train_one_epoch_stage1/2``, ``openclip/model.py`` ``TextProj`` with 1 block of
expansion 8).

* Stage 1, representation inheritance: text only, the original CLIP text tower is the
  teacher, only the adapter trains::

      L1 = sum ||s - t||^2 + SmoothL1_sum(pdist(s), pdist(t))            (s, t: (B, D), normalised)

  ``s`` = adapter(encoder(caption)), ``t`` = CLIP text features of the same caption.
* Stage 2, contrastive tuning with self-distillation: the image tower and the adapter
  train, a frozen copy of the *original* image tower is the teacher::

      L2 = InfoNCE(f, s) + w [ sum ||f - f_T||^2 + SmoothL1_sum(pdist(f), pdist(f_T)) ]

  with sums over the batch (``reduction="sum"`` as in the reference).

Deviations
----------
* The embedder is all-MiniLM-L6-v2 (22.7M parameters, 384-d), not an 8B (LLM2CLIP) or 1B
  (ProCLIP) LLM2Vec Llama; LLM2CLIP's stage A (caption-contrastive fine-tuning of the
  LLM) is not run: the sentence encoder is already contrastively trained on sentence pairs.
* Embeddings are computed live by the frozen encoder (in eval mode, without autograd), not
  precomputed; the result is the same.
* ProCLIP stage 1 uses the one caption per image the Trainer samples (among ShapesWorld's
  phrasings) instead of a "short" and a "raw" caption per sample; the structure term is
  computed on it, as the reference computes it on the short captions only.
* ``w`` (``distill_weight``) is not in ProCLIP's released parameters; the default 0.1 is
  our choice (with sum reductions at batch 128 it makes the distillation terms of the
  order of the contrastive loss once the image features drift).
* Hyper-parameters (layer decay, fp16, batch 4096, CC3M/CC12M) are the Trainer's
  (AdamW, warm-up + cosine) on ShapesWorld at CPU scale.

The CLIP teacher of stage 1 reads its own token ids: :class:`PairedTokenizer` puts the
encoder's ids and CLIP's ids side by side in one (B, T1 + T2) tensor, which the Trainer
batches as it batches any tokens, and the objective splits.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .losses.base import Batch, ModelOutputs, Objective
from .losses.infonce import InfoNCELoss
from .trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_DISTILL_WEIGHT", "PairedTokenizer", "ProCLIPAlignment", "ProCLIPSelfDistillation",
           "distillation_terms", "proclip_align", "proclip_tune", "train_llm2clip", "train_proclip"]

DEFAULT_DISTILL_WEIGHT = 0.1
"""ProCLIP's stage-2 self-distillation weight ``w`` (not released; our choice)."""


def distillation_terms(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ProCLIP's instance and structure distillation terms of (B, D) features.

    Parameters
    ----------
    student, teacher : torch.Tensor of shape (B, D)
        L2-normalised; ``teacher`` carries no gradient.

    Returns
    -------
    (instance, structure) : scalars
        ``sum_ij (s_ij - t_ij)^2`` and ``sum_{a<b} SmoothL1(||s_a - s_b||, ||t_a - t_b||)``
        (``F.mse_loss`` and ``F.smooth_l1_loss`` of ``F.pdist``, ``reduction="sum"``).
    """
    instance = F.mse_loss(student, teacher, reduction="sum")
    structure = F.smooth_l1_loss(F.pdist(student, p=2), F.pdist(teacher, p=2), reduction="sum")
    return instance, structure


class PairedTokenizer:
    """Two tokenizers' ids side by side: ``(B, T1 + T2)`` = [student ids | teacher ids].

    Parameters
    ----------
    student, teacher : callable
        ``list[str] -> LongTensor (B, T)`` each, with fixed ``context_length``.
    """

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher
        self.split_at = int(student.context_length)

    def __call__(self, texts) -> torch.Tensor:
        return torch.cat([self.student(texts), self.teacher(texts)], dim=1)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens[:, :self.split_at], tokens[:, self.split_at:]


class ProCLIPAlignment(Objective):
    """ProCLIP stage 1: the adapter's text features distilled from CLIP's text tower.

    Returns ``{"instance": ..., "structure": ...}`` (:func:`distillation_terms`).

    Parameters
    ----------
    teacher : open_clip.CLIP
        The original CLIP (its text tower is used, frozen).
    tokenizer : PairedTokenizer
        The tokenizer given to the Trainer.
    """

    frozen_modules = ("teacher",)  # rebuilt by every run: not in checkpoints

    def __init__(self, teacher, tokenizer: PairedTokenizer, *, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward_model(self, model, batch: Batch) -> dict:
        """``{"text": student (B, D), "teacher": CLIP's text features (B, D)}``, both normalised."""
        student_ids, teacher_ids = self.tokenizer.split(batch.tokens)
        text = model.encode_text(student_ids, normalize=True)                 # (B, D)
        with torch.no_grad():
            target = self.teacher.encode_text(teacher_ids, normalize=True)    # (B, D)
        return {"text": text, "teacher": target}

    def forward(self, outputs: dict, batch: Batch | None = None) -> dict:
        instance, structure = distillation_terms(outputs["text"], outputs["teacher"])
        return {"instance": instance, "structure": structure}


class ProCLIPSelfDistillation(InfoNCELoss):
    """ProCLIP stage 2: InfoNCE plus self-distillation to the frozen original image tower.

    Returns ``{"contrastive", "instance", "structure"}``, the last two weighted by ``w``.

    Parameters
    ----------
    teacher_visual : nn.Module
        A copy of the image tower before stage 2 (kept frozen).
    distill_weight : float, default :data:`DEFAULT_DISTILL_WEIGHT`
        ``w``; 0 is LLM2CLIP-style contrastive tuning.
    """

    frozen_modules = ("teacher_visual",)  # rebuilt by every run: not in checkpoints

    def __init__(self, teacher_visual, distill_weight: float = DEFAULT_DISTILL_WEIGHT, *, rank: int = 0,
                 world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        if distill_weight < 0:
            raise UsageError(f"distill_weight must be >= 0, got {distill_weight}")
        self.teacher_visual = copy.deepcopy(teacher_visual).eval().requires_grad_(False)
        self.distill_weight = float(distill_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_visual.eval()
        return self

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        out = super().forward_model(model, batch)
        with torch.no_grad():
            out.extras["teacher_image_features"] = F.normalize(self.teacher_visual(batch.images), dim=-1)
        return out

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        terms = super().forward(outputs, batch)
        instance, structure = distillation_terms(outputs.image_features, outputs.extras["teacher_image_features"])
        terms["instance"] = self.distill_weight * instance
        terms["structure"] = self.distill_weight * structure
        return terms


def _fit(bb, tokenizer, train_set, config: TrainConfig, objective: Objective, evaluate, progress):
    Trainer(bb.model, tokenizer, bb.preprocess, train_set, config, evaluate, objective=objective,
            preprocess_cfg=bb.preprocess_cfg, progress=progress).fit()
    bb.model.eval()
    bb.__dict__.pop("fingerprint", None)
    return bb


def _for_sentence_model(evaluate: Callable | None, bb) -> Callable | None:
    """``evaluate(model)`` of a callback written for CLIPs, given the sentence tokenizer."""
    if evaluate is not None and getattr(evaluate, "tokenizer", "absent") is None:
        evaluate = copy.copy(evaluate)
        evaluate.tokenizer = bb.tokenizer
    return evaluate


def train_llm2clip(clip, train_set, config: TrainConfig, *, encoder: str = "all-MiniLM-L6-v2",
                   evaluate: Callable | None = None, progress: bool | None = None):
    """LLM2CLIP: a frozen sentence encoder + new adapter, the CLIP image tower trained contrastively.

    Parameters
    ----------
    clip : Backbone
        A CLIP Backbone; its image tower is the starting point (copied), its text tower unused.
    train_set : map-style dataset of ``(image, captions)``
        As for the Trainer (e.g. :class:`~cliplab.train.datasets.ShapesTrainSet`).
    config : TrainConfig
        ``loss`` is ignored (InfoNCE).
    encoder : str, default "all-MiniLM-L6-v2"
    evaluate : callable, optional
        ``evaluate(model) -> dict``; a :class:`~cliplab.train.recipes.ShapesZeroShot` without a
        tokenizer gets the encoder's.
    progress : bool, optional

    Returns
    -------
    SentenceBackbone
        The trained model (adapter blocks 4, expansion 2).

    Raises
    ------
    ModelLoadError
        The encoder's package is not installed.
    """
    from ..models.sentence import sentence_backbone

    bb = sentence_backbone(clip, encoder=encoder, blocks=4, expansion=2, seed=config.seed,
                           name=f"{clip.name}+{encoder}+llm2clip")
    return _fit(bb, bb.tokenizer, train_set, config, InfoNCELoss(), _for_sentence_model(evaluate, bb), progress)


def proclip_align(clip, train_set, config: TrainConfig, *, encoder: str = "all-MiniLM-L6-v2",
                  progress: bool | None = None):
    """ProCLIP stage 1: a new encoder + adapter model whose adapter is distilled from CLIP's text tower.

    Parameters
    ----------
    clip : Backbone
        The CLIP Backbone: its text tower is the teacher, its image tower (copied, frozen
        in this stage) the new model's.
    train_set : map-style dataset of ``(image, captions)``
        Only the captions are used.
    config : TrainConfig
        ``loss`` is ignored.
    encoder : str, default "all-MiniLM-L6-v2"
    progress : bool, optional

    Returns
    -------
    SentenceBackbone
        Adapter of 1 block, expansion 8 (ProCLIP's ``TextProj``).

    Raises
    ------
    ModelLoadError
        The encoder's package is not installed.
    """
    from ..models.loading import make_tokenizer
    from ..models.sentence import sentence_backbone

    bb = sentence_backbone(clip, encoder=encoder, blocks=1, expansion=8, seed=config.seed,
                           name=f"{clip.name}+{encoder}+proclip")
    model = bb.model
    model.visual.requires_grad_(False)                      # stage 1: only the adapter
    model.logit_scale.requires_grad_(False)
    paired = PairedTokenizer(bb.tokenizer, make_tokenizer(clip.model_cfg))
    _fit(bb, paired, train_set, config, ProCLIPAlignment(clip.model, paired), None, progress)
    model.visual.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    return bb


def proclip_tune(bb, train_set, config: TrainConfig, *, distill_weight: float = DEFAULT_DISTILL_WEIGHT,
                 evaluate: Callable | None = None, progress: bool | None = None):
    """ProCLIP stage 2: contrastive tuning of the image tower and adapter, self-distilled.

    Parameters
    ----------
    bb : SentenceBackbone
        The stage-1 model (:func:`proclip_align`); trained in place and returned.  Its
        image tower at entry is the frozen teacher.
    train_set : map-style dataset of ``(image, captions)``
    config : TrainConfig
        ``loss`` is ignored.
    distill_weight : float, default :data:`DEFAULT_DISTILL_WEIGHT`
        ``w``.
    evaluate : callable, optional
        As in :func:`train_llm2clip`.
    progress : bool, optional

    Returns
    -------
    SentenceBackbone
    """
    objective = ProCLIPSelfDistillation(bb.model.visual, distill_weight)
    return _fit(bb, bb.tokenizer, train_set, config, objective, _for_sentence_model(evaluate, bb), progress)


def train_proclip(clip, train_set, align_config: TrainConfig, config: TrainConfig, *,
                  encoder: str = "all-MiniLM-L6-v2", distill_weight: float = DEFAULT_DISTILL_WEIGHT,
                  evaluate: Callable | None = None, progress: bool | None = None):
    """ProCLIP, both stages: :func:`proclip_align` then :func:`proclip_tune`.

    Parameters
    ----------
    clip : Backbone
        The CLIP Backbone: teacher of stage 1 (its text tower) and of stage 2 (its image
        tower, frozen copy); its image tower is also the student's starting point.
    train_set : map-style dataset of ``(image, captions)``
    align_config, config : TrainConfig
        Stage 1 and stage 2 (each its own ``out_dir``); ``loss`` is ignored.
    encoder : str, default "all-MiniLM-L6-v2"
    distill_weight : float, default :data:`DEFAULT_DISTILL_WEIGHT`
        Stage 2's ``w``.
    evaluate : callable, optional
        As in :func:`train_llm2clip` (run in stage 2).
    progress : bool, optional

    Returns
    -------
    SentenceBackbone
        The trained model (adapter blocks 1, expansion 8).

    Examples
    --------
    >>> import cliplab                                                          # doctest: +SKIP
    >>> from cliplab.train import TrainConfig                                   # doctest: +SKIP
    >>> from cliplab.train.recipes import get_recipe                            # doctest: +SKIP
    >>> from cliplab.train.text_tower import train_proclip                      # doctest: +SKIP
    >>> data = get_recipe("shapes-tiny").train_set                              # doctest: +SKIP
    >>> bb = train_proclip(cliplab.load("shapes-tiny"), data,                   # doctest: +SKIP
    ...                    TrainConfig(steps=100, batch_size=64, out_dir="runs/p1"),
    ...                    TrainConfig(steps=150, batch_size=64, out_dir="runs/p2"))
    >>> bb.save("shapes-tiny-minilm")                                           # doctest: +SKIP
    """
    bb = proclip_align(clip, train_set, align_config, encoder=encoder, progress=progress)
    return proclip_tune(bb, train_set, config, distill_weight=distill_weight, evaluate=evaluate, progress=progress)
