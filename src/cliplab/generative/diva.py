"""DIVA: generative feedback from a frozen diffusion model on CLIP's dense visual condition.

Wang, Sun, Zhang, Tang, Liu, Wang, "Diffusion Feedback Helps CLIP See Better",
ICLR 2025, arXiv:2407.20171; reference code github.com/baaivision/DIVA (commit d53c668,
``models/SD_with_OpenAICLIP.py``, ``condition/OpenAICLIP_for_clip_model.py``,
``models/utils.py``).

Algorithm (per step, images only, no text):

1. condition c = [cls, p_{i_1}, ..., p_{i_k}]: the class token and k patch
   tokens drawn uniformly *with replacement* (``torch.randint``), each through ``ln_post``
   and the tower's projection (reference: k = 76 of ViT-L/14's 256, mapped by a new
   ``visual_proj`` Linear(768, 1024) and added to the empty-prompt text embedding);
2. for each image, ``train_steps = 2`` draws of t ~ U{0, ..., 999} (``initiate_time_steps``,
   ``torch.randint``) and ε ~ N(0, I);
   x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε;
3. loss = ||ε - ε_θ(x_t, t, c)||² (``mse_loss``), gradients into the CLIP vision tower and
   ``visual_proj`` only: the diffusion UNet, its VAE and text encoder are frozen
   (``adapt_only_classifier=True``); the CLIP text tower is only used under ``no_grad``, so
   text alignment is kept by not touching the text tower (no alignment loss).

Defaults here: k = 16 of shapes-tiny's 64 tokens (the reference's ~30 % share), two
timesteps per image, 150 AdamW steps of 32 images at lr 3e-5 with 10 warm-up steps, no
weight decay.

Deviations
----------
- The generator is :class:`~cliplab.generative.generator.TinyUNet` in pixel space at 32 px,
  trained on ShapesWorld conditioned on the *frozen original* tower's tokens
  (:func:`~cliplab.generative.generator.train_generator` with ``mode="tokens"``), where the
  reference uses Stable Diffusion 2.1 trained on text.  Hence no ``visual_proj``: the
  generator already reads the tower's D-dimensional tokens (the reference needs it to map
  CLIP's 768 to SD's 1024-wide context), and no empty-prompt embedding.
- AdamW (the one Trainer) with a warm-up and cosine schedule instead of SGD with momentum
  0.9 at a constant lr 1e-4; 150 steps of 32 instead of 4,600 steps of 640.
- ShapesWorld scenes instead of CC3M.
"""

from __future__ import annotations

from ..errors import UsageError
from .generator import ConditionalGenerator, finetune_through


def diva(backbone, generator: ConditionalGenerator, images, *, config=None, n_timesteps: int = 2,
         timesteps: tuple[int, int] | None = None,
         progress: bool | None = None):
    """Fine-tune ``backbone``'s vision tower with DIVA's diffusion feedback.

    Parameters
    ----------
    backbone : Backbone
        Not changed; its text tower and ``logit_scale`` are carried over bit for bit.
    generator : ConditionalGenerator
        Trained with ``mode="tokens"`` on this Backbone's frozen tower; kept frozen.
    images : sequence of uint8 arrays (S, S, 3) at the Backbone's size, or a Trainer set
        Unlabelled training images.
    config : TrainConfig, optional
        Default: 150 steps of 32, lr 3e-5, 10 warm-up steps, weight decay 0, grad clip 1,
        ``out_dir="runs/diva"``.
    n_timesteps : int, default 2
        Timestep draws per image and step (the reference's ``train_steps``).
    timesteps : (int, int), optional
        ``(lo, hi)``: feedback only from ``t ~ U{lo, ..., hi - 1}``.  Default: all
        ``U{0, ..., 999}``, as the reference (``initiate_time_steps`` with its default
        ``random_timestep_per_iteration``: ``torch.randint(0, 1000, ...)``).

    Returns
    -------
    Backbone
        Named ``"<name>+diva"``; accepted wherever a Backbone is.

    Raises
    ------
    UsageError
        A generator not conditioned on tokens, or on another width than the Backbone's.

    Examples
    --------
    >>> import cliplab                                                          # doctest: +SKIP
    >>> from cliplab.generative.generator import shapes_images, train_generator
    >>> bb = cliplab.load("shapes-tiny")                                        # doctest: +SKIP
    >>> images = shapes_images(2000)                                            # doctest: +SKIP
    >>> gen = train_generator(bb, images, mode="tokens")                        # doctest: +SKIP
    >>> tuned = diva(bb, gen, images)                                           # doctest: +SKIP
    """
    from ..train import TrainConfig

    if generator.cfg.mode != "tokens":
        raise UsageError(f"DIVA conditions on visual tokens: train the generator with mode='tokens', "
                         f"not {generator.cfg.mode!r}")
    config = config or TrainConfig(steps=150, batch_size=32, lr=3e-5, warmup_steps=10, weight_decay=0.0,
                                   ckpt_every=0, log_every=25, out_dir="runs/diva")
    return finetune_through(backbone, generator, images, config=config, n_timesteps=n_timesteps,
                            name=f"{backbone.name}+diva", timesteps=timesteps, progress=progress)
