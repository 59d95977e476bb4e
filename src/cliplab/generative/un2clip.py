"""un²CLIP: invert an unCLIP-style generator to sharpen CLIP's image encoder.

Li, Zhao, Chang, Hou, Shan, Chen, "un²CLIP: Improving CLIP's Visual Detail Capturing
Ability via Inverting unCLIP", arXiv:2505.24517 (code announced at
github.com/LiYinqi/un2CLIP; not readable offline here, so this module follows the paper
and is checked against closed forms).

unCLIP (Ramesh et al., arXiv:2204.06125) trains an image generator conditioned on the
*frozen* CLIP image embedding, i.e. a decoder that inverts CLIP's image encoder.
un²CLIP inverts that decoder in turn: the generator is frozen and the image encoder is
trained so that the generator, conditioned on the encoder's embedding of an image,
reconstructs (denoises) that image:

    min_E  E_{x, t, ε} || ε - ε_θ(sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε, t, E(x)) ||²

with t uniform and ε standard normal.  Because the generator's condition space is the
original CLIP image-text space, the embedding is pushed to carry the image details the
generator needs while staying where the generator (and so the frozen text tower) can
read it: text alignment is kept by freezing the text tower and the generator, with no
extra alignment loss.

Defaults here: the generator is :class:`~cliplab.generative.generator.TinyUNet` with the
``"global"`` condition (the L2-normalised embedding, FiLM through the timestep embedding),
trained on the frozen original tower; 150 AdamW steps of 32 images at lr 3e-5 with 10
warm-up steps, no weight decay, one timestep per image.

Deviations
----------
- A 0.5 M-parameter pixel-space UNet at 32 px trained for minutes on ShapesWorld instead
  of Stable unCLIP (SD 2.1, latent space, its noise-augmentation level input); no text
  condition in the generator, no classifier-free guidance.
- The whole vision tower is trained (the paper's choice of trained layers could not be
  checked against its code); AdamW with warm-up and cosine decay (the one Trainer).
"""

from __future__ import annotations

from ..errors import UsageError
from .generator import ConditionalGenerator, finetune_through


def un2clip(backbone, generator: ConditionalGenerator, images, *, config=None, n_timesteps: int = 1,
            timesteps: tuple[int, int] | None = None,
            progress: bool | None = None):
    """Fine-tune ``backbone``'s image encoder so that the frozen unCLIP-style ``generator`` reconstructs its input.

    Parameters
    ----------
    backbone : Backbone
        Not changed; its text tower and ``logit_scale`` are carried over bit for bit.
    generator : ConditionalGenerator
        Trained with ``mode="global"`` on this Backbone's frozen tower (unCLIP's decoder); kept frozen.
    images : sequence of uint8 arrays (S, S, 3) at the Backbone's size, or a Trainer set
        Unlabelled training images.
    config : TrainConfig, optional
        Default: 150 steps of 32, lr 3e-5, 10 warm-up steps, weight decay 0, grad clip 1,
        ``out_dir="runs/un2clip"``.
    n_timesteps : int, default 1
    timesteps : (int, int), optional
        ``(lo, hi)``: feedback only from ``t ~ U{lo, ..., hi - 1}``.  Default: all T, the
        paper's objective (t uniform).

    Returns
    -------
    Backbone
        Named ``"<name>+un2clip"``; accepted wherever a Backbone is.

    Raises
    ------
    UsageError
        A generator not conditioned on the global embedding, or on another width.

    Examples
    --------
    >>> import cliplab                                                          # doctest: +SKIP
    >>> from cliplab.generative.generator import shapes_images, train_generator
    >>> bb = cliplab.load("shapes-tiny")                                        # doctest: +SKIP
    >>> images = shapes_images(2000)                                            # doctest: +SKIP
    >>> gen = train_generator(bb, images, mode="global")                        # doctest: +SKIP
    >>> tuned = un2clip(bb, gen, images)                                        # doctest: +SKIP
    """
    from ..train import TrainConfig

    if generator.cfg.mode != "global":
        raise UsageError(f"un2CLIP inverts an unCLIP-style generator: train it with mode='global', "
                         f"not {generator.cfg.mode!r}")
    config = config or TrainConfig(steps=150, batch_size=32, lr=3e-5, warmup_steps=10, weight_decay=0.0,
                                   ckpt_every=0, log_every=25, out_dir="runs/un2clip")
    return finetune_through(backbone, generator, images, config=config, n_timesteps=n_timesteps,
                            name=f"{backbone.name}+un2clip", timesteps=timesteps, progress=progress)
