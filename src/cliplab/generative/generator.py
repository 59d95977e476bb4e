"""A small conditional denoising-diffusion generator on CLIP visual features.

The generator of the generative-feedback methods (:mod:`cliplab.generative.diva`,
:mod:`cliplab.generative.un2clip`): a tiny UNet that predicts the noise of a noised
ShapesWorld image (DDPM, Ho et al., "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, arXiv:2006.11239), conditioned on what a Backbone's vision tower sees.

Two conditions, the two the papers use:

- ``"global"`` (unCLIP, Ramesh et al., arXiv:2204.06125, as un²CLIP inverts it): the
  L2-normalised image embedding (B, D), projected and added to the timestep embedding,
  which every residual block reads as a FiLM scale and shift;
- ``"tokens"`` (DIVA, Wang et al., arXiv:2407.20171): the class token and ``n_tokens``
  patch tokens drawn at random with replacement, both through ``ln_post`` and the
  tower's projection (B, 1 + n_tokens, D), read by cross-attention at the 16×16 and 8×8
  levels (DIVA feeds 1 + 76 of ViT-L/14's 256 tokens to Stable Diffusion's
  cross-attention; here 1 + 16 of shapes-tiny's 64).

Training (:func:`train_generator`, through the one :class:`~cliplab.train.Trainer`):
the Backbone's vision tower is frozen (a copy; the Backbone given is not touched),
``t ~ U{0, ..., T-1}``, ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (Ho et al. eq. 4) and
the loss is ``||ε - ε_θ(x_t, t, c)||²`` (their ``L_simple``, eq. 14).  Linear β
schedule 1e-4 … 0.02 over T = 1000 steps (theirs).  :func:`sample` draws pictures with
deterministic DDIM (Song et al., arXiv:2010.02502, eq. 12 with σ = 0).

Deviations (all for CPU minutes): pixel space, not a VAE latent; images are taken at
the model's 64 px and average-pooled to 32 px; one residual block per level and widths
16/32/64 (about 0.5 M parameters); no classifier-free guidance and no text condition.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..train.losses.base import Objective

logger = logging.getLogger("cliplab.generative")

MODES = ("global", "tokens")


# ----------------------------------------------------------------------------- diffusion maths


def ddpm_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s) of DDPM's linear schedule: float32 (T,)."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. eq. 4): (B, C, H, W)."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def timestep_range(timesteps, steps: int) -> tuple[int, int]:
    """``(lo, hi)``: the timesteps ``t ~ U{lo, ..., hi - 1}`` are drawn from; ``None`` is all of ``(0, steps)``.

    Raises
    ------
    UsageError
        Unless ``0 <= lo < hi <= steps``.
    """
    if timesteps is None:
        return 0, steps
    try:
        lo, hi = (int(v) for v in timesteps)
    except (TypeError, ValueError):
        raise UsageError(f"timesteps must be a pair (lo, hi), got {timesteps!r}") from None
    if not 0 <= lo < hi <= steps:
        raise UsageError(f"timesteps must satisfy 0 <= lo < hi <= {steps}, got ({lo}, {hi})")
    return lo, hi


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM's ``L_simple`` (Ho et al. eq. 14): mean squared error of the predicted noise."""
    return F.mse_loss(eps_pred.float(), noise.float())


# ----------------------------------------------------------------------------- the condition


def vision_features(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled embedding (B, D) and the projected patch tokens (B, N, D) of an open_clip ViT.

    Both through ``ln_post`` and the output projection ``proj`` (the tokens as dense methods
    map them); neither L2-normalised.
    """
    if not hasattr(visual, "output_tokens"):
        raise UsageError(f"{type(visual).__name__} does not expose patch tokens; generative feedback "
                         "needs an open_clip VisionTransformer")
    old = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)                                        # (B, D), (B, N, W)
    finally:
        visual.output_tokens = old
    if getattr(visual, "proj", None) is not None:
        tokens = tokens @ visual.proj                                          # (B, N, D)
    return pooled, tokens


def clip_condition(visual: nn.Module, images: torch.Tensor, mode: str, n_tokens: int = 16) -> torch.Tensor:
    """What the generator is conditioned on.

    Parameters
    ----------
    visual : open_clip VisionTransformer
    images : Tensor (B, 3, H, W)
        Preprocessed as the Backbone's ``preprocess_cfg`` says.
    mode : {"global", "tokens"}
        ``"global"``: the L2-normalised image embedding (B, D) (unCLIP's condition);
        ``"tokens"``: the class token and ``n_tokens`` patch tokens drawn uniformly with
        replacement from torch's global generator (B, 1 + n_tokens, D) (DIVA's condition).
    n_tokens : int, default 16
    """
    pooled, tokens = vision_features(visual, images)
    if mode == "global":
        return F.normalize(pooled.float(), dim=-1)                             # (B, D)
    if mode == "tokens":
        B, N, _ = tokens.shape
        pick = torch.randint(0, N, (B, n_tokens), device=tokens.device)      # DIVA: randint, with replacement
        picked = torch.gather(tokens, 1, pick[..., None].expand(-1, -1, tokens.shape[-1]))
        return torch.cat([pooled[:, None], picked], dim=1).float()            # (B, 1 + k, D)
    raise UsageError(f"unknown condition mode {mode!r}; choose one of {', '.join(MODES)}")


def generator_pixels(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """Backbone-normalised images (B, 3, S, S) -> the generator's pixels in [-1, 1] at ``size``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    x = (images * s + m).clamp(0, 1) * 2 - 1
    if x.shape[-1] != size:
        x = F.adaptive_avg_pool2d(x, size)
    return x


# ----------------------------------------------------------------------------- the UNet


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; DDPM's): (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding gives a FiLM scale and shift between them."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                  # (B, C, H, W)
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """x + Attn(q = GN(x), k = v = context): the feature map reads the condition tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)                            # (B, HW, C)
        out, _ = self.attn(q, context, context, need_weights=False)           # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


@dataclass
class GeneratorConfig:
    """Architecture of :class:`TinyUNet` (stored with the generator).

    Parameters
    ----------
    mode : {"global", "tokens"}
    cond_dim : int
        D, the width of the condition vectors (the Backbone's ``embed_dim``).
    image_size : int, default 32
    width : int, default 16
        Channels of the first level; the levels have ``width * mult`` channels.
    mults : tuple of int, default (1, 2, 4)
        One level per entry, each half the side of the previous (32, 16, 8 px).
    n_tokens : int, default 16
        Patch tokens drawn per image in ``"tokens"`` mode.
    steps : int, default 1000
        Diffusion steps T.
    """

    mode: str
    cond_dim: int
    image_size: int = 32
    width: int = 16
    mults: tuple = (1, 2, 4)
    n_tokens: int = 16
    steps: int = 1000

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown condition mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.image_size % (2 ** (len(self.mults) - 1)):
            raise UsageError(f"image_size {self.image_size} must be divisible by {2 ** (len(self.mults) - 1)}")
        if self.width % 8:
            raise UsageError(f"width must be a multiple of 8 (GroupNorm groups), got {self.width}")


class TinyUNet(nn.Module):
    """ε_θ(x_t, t, c): a small UNet predicting the noise of a noised image (B, 3, S, S).

    One residual block per level on the way down and up, skip connections by
    concatenation, a middle block; the condition enters by FiLM through the timestep
    embedding (``"global"``) or by cross-attention on the two coarsest levels and the
    middle (``"tokens"``).  The output convolution starts at zero.
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, emb = cfg.width, 4 * cfg.width
        chans = [w * m for m in cfg.mults]
        self.time_mlp = nn.Sequential(nn.Linear(w, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_mlp = (nn.Sequential(nn.Linear(cfg.cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
                         if cfg.mode == "global" else None)
        self.conv_in = nn.Conv2d(3, w, 3, padding=1)
        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = w
        for i, c in enumerate(chans):
            self.down.append(ResBlock(prev, c, emb))
            self.down_attn.append(self._attn(c, i))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c
        self.mid1 = ResBlock(prev, prev, emb)
        self.mid_attn = self._attn(prev, len(chans))
        self.mid2 = ResBlock(prev, prev, emb)
        self.up, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            self.up.append(ResBlock(prev + c, c, emb))
            self.up_attn.append(self._attn(c, i))
            self.upsample.append(nn.Identity() if i == 0 else nn.Upsample(scale_factor=2, mode="nearest"))
            prev = c
        self.norm_out = nn.GroupNorm(8, prev)
        self.conv_out = nn.Conv2d(prev, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _attn(self, channels: int, level: int) -> nn.Module:
        if self.cfg.mode == "tokens" and level >= 1:
            return CrossAttention(channels, self.cfg.cond_dim)
        return _NoAttention()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, 3, S, S) of ``x`` (B, 3, S, S) at steps ``t`` (B,) given ``cond``.

        ``cond``: (B, D) in ``"global"`` mode, (B, K, D) in ``"tokens"`` mode.
        """
        emb = self.time_mlp(timestep_embedding(t, self.cfg.width))             # (B, 4w)
        if self.cond_mlp is not None:
            emb = emb + self.cond_mlp(cond)                                    # unCLIP: added to the time embedding
        h = self.conv_in(x)
        skips = []
        for block, attn, down in zip(self.down, self.down_attn, self.downsample):
            h = attn(block(h, emb), cond)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), cond), emb)
        for block, attn, up in zip(self.up, self.up_attn, self.upsample):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb), cond)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _NoAttention(nn.Module):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------- the generator


class ConditionalGenerator(nn.Module):
    """A vision tower and a :class:`TinyUNet`: what the Trainer trains.

    The same module serves the three stages; only what requires a gradient changes:
    training the generator (tower frozen), DIVA and un²CLIP (UNet frozen, tower trained).

    Parameters
    ----------
    visual : open_clip VisionTransformer
        The tower the condition comes from (held, not copied).
    unet : TinyUNet
    mean, std : sequence of 3 floats
        The Backbone's normalisation (``preprocess_cfg``), to recover pixels.
    """

    def __init__(self, visual: nn.Module, unet: TinyUNet, mean, std):
        super().__init__()
        self.visual = visual
        self.unet = unet
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(unet.cfg.steps), persistent=False)

    @property
    def cfg(self) -> GeneratorConfig:
        return self.unet.cfg

    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """The condition of Backbone-normalised images (B, 3, H, W)."""
        return clip_condition(self.visual, images, self.cfg.mode, self.cfg.n_tokens)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """x_0: the images in [-1, 1] at the generator's size (B, 3, S, S)."""
        return generator_pixels(images, self.mean, self.std, self.cfg.image_size)

    def denoise(self, images: torch.Tensor, n_timesteps: int = 1,
                timesteps: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """One Monte-Carlo draw of the denoising loss's inputs for a batch.

        Each image is noised at ``n_timesteps`` timesteps drawn uniformly from
        ``timesteps = (lo, hi)`` (``t ~ U{lo, ..., hi - 1}``; default all T, as DDPM and
        DIVA) with fresh noise (DIVA's ``train_steps = 2``); returns
        ``{"eps": ε_θ(x_t, t, c), "noise": ε, "t": t}``, the first two
        (n_timesteps * B, 3, S, S), ``t`` (n_timesteps * B,).
        """
        lo, hi = timestep_range(timesteps, self.cfg.steps)
        cond = self.condition(images)                                          # (B, D) or (B, K, D)
        x0 = self.pixels(images)                                               # (B, 3, S, S)
        if n_timesteps > 1:
            x0 = x0.repeat(n_timesteps, 1, 1, 1)
            cond = cond.repeat(n_timesteps, *([1] * (cond.ndim - 1)))
        t = torch.randint(lo, hi, (x0.shape[0],), device=x0.device)           # t ~ U{lo..hi-1}
        noise = torch.randn_like(x0)
        eps = self.unet(q_sample(x0, t, noise, self.alphas_cumprod), t, cond)
        return {"eps": eps, "noise": noise, "t": t}


class DenoisingObjective(Objective):
    """The Trainer's objective for every stage: DDPM's ``L_simple`` on the module's :meth:`denoise`.

    Parameters
    ----------
    n_timesteps : int, default 1
        Timesteps drawn per image and step.
    timesteps : (int, int), optional
        ``(lo, hi)``: draw ``t`` from ``U{lo, ..., hi - 1}`` only; default all T.
    """

    needs_captions = False

    def __init__(self, *, n_timesteps: int = 1, timesteps: tuple[int, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.n_timesteps = n_timesteps
        self.timesteps = timesteps

    def forward_model(self, model: ConditionalGenerator, batch) -> dict:
        return model.denoise(batch.images, self.n_timesteps, self.timesteps)

    def forward(self, outputs: dict, batch=None) -> dict[str, torch.Tensor]:
        return {"denoise": denoising_loss(outputs["eps"], outputs["noise"])}


class ImageSet:
    """Images as a Trainer training set without captions: item i is ``(images[i], None)``."""

    def __init__(self, images):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], None


def shapes_images(n: int, *, split: str = "train", seed: int = 0, pairs_fraction: float = 0.0) -> list[np.ndarray]:
    """``n`` ShapesWorld training images (uint8 (64, 64, 3)), no captions.

    Scenes of 1-3 objects of the ``retrieval`` task; with ``pairs_fraction`` > 0 that share
    are images of the ``pairs`` task's split instead (unlabelled: only pixels are used).
    """
    from ..data.shapes import shapes_task

    n_pairs_images = int(round(n * pairs_fraction)) // 2 * 2
    images = list(shapes_task("retrieval", split, n - n_pairs_images, seed=seed).items)
    if n_pairs_images:
        images += list(shapes_task("pairs", split, n_pairs_images // 2, seed=seed).items)
    return images


def _train_set(images):
    """A Trainer set of ``images``: a sequence or an array of uint8 images, or a set already."""
    if isinstance(images, (list, tuple, np.ndarray)):
        return ImageSet(images)
    return images


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def train_generator(backbone, images, *, mode: str = "global", config=None, gen_config: dict | None = None,
                    n_timesteps: int = 1, timesteps: tuple[int, int] | None = None,
                    progress: bool | None = None) -> ConditionalGenerator:
    """Train a :class:`TinyUNet` on ``images`` conditioned on the frozen ``backbone``'s vision tower.

    Parameters
    ----------
    backbone : Backbone
        Its vision tower is copied and frozen; ``backbone`` itself is not changed.
    images : sequence of uint8 arrays (S, S, 3) at the Backbone's size, or a Trainer set
        The training images (captions are not used).
    mode : {"global", "tokens"}, default "global"
    config : TrainConfig, optional
        Default: 400 steps of 32, lr 2e-3, 50 warm-up steps, weight decay 0, no
        intermediate checkpoints, ``out_dir="runs/generator"``.
    gen_config : dict, optional
        Overrides of :class:`GeneratorConfig` (``width``, ``image_size``, ``n_tokens``...).
    n_timesteps : int, default 1
    timesteps : (int, int), optional
        ``(lo, hi)``: train on ``t ~ U{lo, ..., hi - 1}`` only (e.g. high noise, where only
        the condition can tell the generator what to draw; :func:`denoising_error` with
        ``shuffle_conditions`` measures how much it does); default all T (DDPM).  Such a
        generator denoises only that band well; feed it back on the same band.

    Returns
    -------
    ConditionalGenerator
        In eval mode, everything frozen.

    Examples
    --------
    >>> import cliplab                                                     # doctest: +SKIP
    >>> from cliplab.generative.generator import shapes_images, train_generator, sample
    >>> bb = cliplab.load("shapes-tiny")                                   # doctest: +SKIP
    >>> gen = train_generator(bb, shapes_images(2000), mode="global")      # doctest: +SKIP
    >>> pictures = sample(gen, shapes_images(4, split="test"), steps=50)   # doctest: +SKIP
    """
    from ..train import TrainConfig, Trainer

    cfg = GeneratorConfig(mode=mode, cond_dim=backbone.embed_dim, **(gen_config or {}))
    timestep_range(timesteps, cfg.steps)
    unet = TinyUNet(cfg)
    pp = backbone.preprocess_cfg
    gen = ConditionalGenerator(_frozen(copy.deepcopy(backbone.model.visual)), unet, pp["mean"], pp["std"])
    config = config or TrainConfig(steps=400, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.0,
                                   ckpt_every=0, log_every=50, out_dir="runs/generator")
    train_set = _train_set(images)
    logger.info("training a %s-conditioned generator (%d parameters) for %d steps", mode,
                sum(p.numel() for p in unet.parameters()), config.steps)
    Trainer(gen, None, None, train_set, config,
            objective=DenoisingObjective(n_timesteps=n_timesteps, timesteps=timesteps),
            preprocess_cfg=_pp_cfg(backbone), progress=progress).fit()
    gen.visual.eval()
    return _frozen(gen)


def _pp_cfg(backbone) -> dict:
    pp = backbone.preprocess_cfg
    size = pp.get("size", backbone.image_size)
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return {"size": size, "mean": list(pp["mean"]), "std": list(pp["std"])}


def generator_config(gen: ConditionalGenerator) -> dict:
    """The generator's :class:`GeneratorConfig` as a dict (for results files)."""
    return asdict(gen.cfg)


@torch.no_grad()
def denoising_error(gen: ConditionalGenerator, images, *, visual: nn.Module | None = None, n_timesteps: int = 4,
                    seed: int = 0, batch_size: int = 64, shuffle_conditions: bool = False,
                    timesteps: tuple[int, int] | None = None) -> float:
    """The generator's ``L_simple`` on ``images`` at seeded timesteps and noise (a held-out score).

    Parameters
    ----------
    gen : ConditionalGenerator
    images : sequence of uint8 arrays (S, S, 3) at the Backbone's size
    visual : open_clip VisionTransformer, optional
        Condition on this tower instead of ``gen.visual`` (a fine-tuned one: how well the
        frozen generator reads it).
    n_timesteps : int, default 4
        Draws per image; the draws (timesteps, noise, tokens) depend only on ``seed``, so
        two calls with the same seed see the same draws.
    shuffle_conditions : bool, default False
        Give every image the condition of the next one in its batch: the rise of the error
        over the matched condition is how much the generator uses the condition (the
        signal generative feedback can pass to the tower).
    timesteps : (int, int), optional
        ``(lo, hi)``: draw ``t`` from ``U{lo, ..., hi - 1}`` only (the error of one noise
        band); default all T.
    """
    lo, hi = timestep_range(timesteps, gen.cfg.steps)
    probe = ConditionalGenerator(visual if visual is not None else gen.visual, gen.unet, gen.mean, gen.std).eval()
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            x = _images_tensor(gen, images[i:i + batch_size]).to(gen.alphas_cumprod.device)
            cond = probe.condition(x)                                          # (B, D) or (B, K, D)
            if shuffle_conditions:
                cond = cond.roll(1, dims=0)
            x0 = probe.pixels(x).repeat(n_timesteps, 1, 1, 1)                  # (nB, 3, S, S)
            cond = cond.repeat(n_timesteps, *([1] * (cond.ndim - 1)))
            t = torch.randint(lo, hi, (x0.shape[0],), device=x0.device)
            noise = torch.randn_like(x0)
            eps = gen.unet(q_sample(x0, t, noise, gen.alphas_cumprod), t, cond)
            total += float(F.mse_loss(eps, noise, reduction="sum")) / eps[0].numel()
            n += eps.shape[0]
    return total / n


# ----------------------------------------------------------------------------- sampling


def _images_tensor(gen: ConditionalGenerator, images) -> torch.Tensor:
    """uint8 images (S, S, 3) at the Backbone's size -> normalised (B, 3, S, S); tensors pass through."""
    from ..models.transforms import uint8_to_tensor

    if isinstance(images, torch.Tensor):
        return images
    return uint8_to_tensor([np.asarray(im) for im in images], {"mean": gen.mean, "std": gen.std})


@torch.no_grad()
def sample(gen: ConditionalGenerator, images, *, steps: int = 50, seed: int = 0,
           start: float = 1.0) -> np.ndarray:
    """Pictures the generator draws from the condition of ``images``: uint8 (B, S, S, 3).

    Deterministic DDIM (Song et al. eq. 12, σ = 0) over ``steps`` evenly spaced timesteps.
    ``start`` < 1 starts from the input noised to ``t = start * T`` instead of pure noise
    (a reconstruction, SDEdit-style); 1.0 generates from the condition alone.

    Parameters
    ----------
    gen : ConditionalGenerator
    images : sequence of uint8 arrays (S, S, 3) at the Backbone's size, or a normalised Tensor (B, 3, S, S)
    steps : int, default 50
    seed : int, default 0
        Seeds the starting noise and the token draw of ``"tokens"`` mode.
    start : float in (0, 1], default 1.0
    """
    if not 0 < start <= 1:
        raise UsageError(f"start must be in (0, 1], got {start}")
    gen = gen.eval()
    device = gen.alphas_cumprod.device
    x_in = _images_tensor(gen, images).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cond = gen.condition(x_in)
    T = gen.cfg.steps
    t_first = int(round(start * (T - 1)))
    ts = np.linspace(t_first, 0, steps).round().astype(int)
    a = gen.alphas_cumprod
    S = gen.cfg.image_size
    noise = torch.randn(len(x_in), 3, S, S, generator=g).to(device)
    x = noise if start >= 1 else q_sample(gen.pixels(x_in), torch.full((len(x_in),), t_first, device=device), noise, a)
    for i, t in enumerate(ts):
        tt = torch.full((len(x),), int(t), dtype=torch.long, device=device)
        eps = gen.unet(x, tt, cond)
        a_t = a[t]
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)       # predicted x_0
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps                    # DDIM eq. 12, σ = 0
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- feedback


def finetune_through(backbone, gen: ConditionalGenerator, images, *, config, n_timesteps: int = 1, name: str,
                     timesteps: tuple[int, int] | None = None, progress: bool | None = None):
    """Fine-tune ``backbone``'s vision tower by the denoising loss of the frozen generator ``gen``.

    What DIVA and un²CLIP share: a copy of the Backbone's model whose vision tower alone
    requires a gradient (the text tower, ``logit_scale`` and everything else stay frozen),
    ``gen``'s UNet, frozen, conditioned on that tower, :class:`DenoisingObjective` through
    the Trainer.  ``timesteps = (lo, hi)`` restricts the feedback to ``t ~ U{lo, ..., hi - 1}``
    (default all T).

    Returns
    -------
    Backbone
        ``backbone.with_model`` of the fine-tuned model, named ``name``; ``backbone`` and
        ``gen`` are not changed.
    """
    from ..train import Trainer

    if gen.cfg.cond_dim != backbone.embed_dim:
        raise UsageError(f"the generator is conditioned on {gen.cfg.cond_dim}-d features, the Backbone "
                         f"embeds in {backbone.embed_dim}")
    timestep_range(timesteps, gen.cfg.steps)                                  # a bad range fails before any copy
    dtype = next(backbone.model.parameters()).dtype
    model = copy.deepcopy(backbone.model).float()       # trained in fp32, returned in the Backbone's dtype
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    unet = gen.unet
    was = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)          # frozen: the gradient passes through it to the condition only
    student = ConditionalGenerator(model.visual, unet, gen.mean, gen.std)
    train_set = _train_set(images)
    logger.info("%s: fine-tuning the vision tower (%d parameters) through the frozen generator for %d steps",
                name, sum(p.numel() for p in student.parameters() if p.requires_grad), config.steps)
    try:
        Trainer(student, None, None, train_set, config,
                objective=DenoisingObjective(n_timesteps=n_timesteps, timesteps=timesteps),
                preprocess_cfg=_pp_cfg(backbone), progress=progress).fit()
    finally:
        unet.eval()
        for n, p in unet.named_parameters():
            p.requires_grad_(was[n])
    model.requires_grad_(False)
    return backbone.with_model(model.to(device=backbone.device, dtype=dtype).eval(), name=name)
