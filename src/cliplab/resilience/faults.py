"""Bit-flip fault injection in model weights, and fault campaigns over bit-error rates.

The fault model of ProAct's toolbox (Mousavi et al., 2024; PyPI ``rrelu``,
``rrelu/pytorchfi/weight_error_models.py``): in every weight tensor of the chosen layers,
``int(numel × bits × BER)`` bits are flipped at uniformly random (element, bit) positions;
each trial draws a new fault map.  Two storage formats:

- ``"fp32"``: the IEEE-754 float32 bits of the weight (bit 31 the sign, 30–23 the
  exponent, 22–0 the mantissa); an exponent flip can turn 1.0 into 2**128 (inf) — the
  reference replaces ±inf by ±1e31, and so do we (``nan`` by 0);
- ``"int8"``: the weight quantized symmetrically per tensor (``scale = max|W| / 127``),
  the flip applied to the two's-complement int8 code (bit 7 the sign), then dequantized.

Deviation: the positions of one tensor are drawn **without** replacement, so exactly the
requested number of distinct bits flips (the reference may hit a bit twice, flipping it
back); the count is reported.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .._progress import progress_bar
from ..errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "flip_bits", "weight_tensors", "inject_faults", "FaultReport", "fault_campaign"]

FORMATS = {"fp32": 32, "int8": 8}
_INF_REPLACEMENT = 1e31


def _positions(n_elements: int, bits: int, n_flips: int, rng: np.random.Generator) -> np.ndarray:
    """``n_flips`` distinct positions in [0, n_elements·bits), uniformly at random."""
    total = n_elements * bits
    if n_flips > total:
        raise UsageError(f"cannot flip {n_flips} distinct bits of a tensor with {total} bits")
    if n_flips * 4 > total:                       # dense: a permutation prefix
        return rng.permutation(total)[:n_flips]
    chosen = np.unique(rng.integers(0, total, size=n_flips))
    while len(chosen) < n_flips:                  # sparse: top up the collisions
        more = rng.integers(0, total, size=n_flips - len(chosen))
        chosen = np.unique(np.concatenate([chosen, more]))
    return rng.permutation(chosen)[:n_flips]


def flip_bits(weight: torch.Tensor, n_flips: int, *, fmt: str = "fp32",
              rng: np.random.Generator | int | None = None) -> torch.Tensor:
    """A copy of ``weight`` with ``n_flips`` distinct random bits flipped in format ``fmt``.

    Parameters
    ----------
    weight : torch.Tensor
        Any shape, floating point.
    n_flips : int
        Number of distinct (element, bit) positions to flip.
    fmt : {"fp32", "int8"}
    rng : numpy Generator or int seed, optional

    Returns
    -------
    torch.Tensor
        Same shape and dtype; float32 arithmetic.

    Raises
    ------
    UsageError
        Unknown format or more flips than bits.
    """
    if fmt not in FORMATS:
        raise UsageError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    w = weight.detach().to("cpu", torch.float32).contiguous().reshape(-1).clone()
    if n_flips <= 0:
        return w.reshape(weight.shape).to(weight.dtype)
    bits = FORMATS[fmt]
    pos = _positions(w.numel(), bits, int(n_flips), rng)
    # one XOR mask per element: its flipped bits are distinct, so their sum is their OR
    mask = np.zeros(w.numel(), dtype=np.uint64)
    np.add.at(mask, pos // bits, np.left_shift(np.uint64(1), (pos % bits).astype(np.uint64)))
    if fmt == "fp32":
        raw = w.numpy().view(np.uint32) ^ mask.astype(np.uint32)
        out = torch.from_numpy(raw.view(np.float32).copy())
        out = torch.nan_to_num(out, nan=0.0, posinf=_INF_REPLACEMENT, neginf=-_INF_REPLACEMENT)
    else:
        amax = float(w.abs().max())
        scale = amax / 127 if amax > 0 else 1.0
        codes = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8).numpy()
        raw = codes.view(np.uint8) ^ mask.astype(np.uint8)
        out = torch.from_numpy(raw.view(np.int8).astype(np.float32) * np.float32(scale))
    return out.reshape(weight.shape).to(weight.dtype)


def weight_tensors(model: torch.nn.Module, tower: str = "image") -> list[tuple[str, torch.nn.Parameter]]:
    """The weights a fault campaign hits: matmul weights of the tower, and clipping thresholds.

    Every ``nn.Linear``/``nn.Conv2d`` weight, attention in-projection and final projection of
    ``tower`` (``"image"``: ``model.visual``; ``"text"``: the text transformer and
    ``text_projection``; ``"both"``), plus the thresholds of ProAct's bounded activations
    (the reference counts bound layers as fault targets).
    """
    roots = {"image": [("visual", getattr(model, "visual", None))],
             "text": [("transformer", getattr(model, "transformer", None))]}
    if tower not in ("image", "text", "both"):
        raise UsageError(f"tower must be image, text or both, got {tower!r}")
    chosen = roots["image"] + roots["text"] if tower == "both" else roots[tower]
    out = []
    for prefix, root in chosen:
        if root is None:
            continue
        for name, p in root.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (p.ndim >= 2 and leaf in ("weight", "in_proj_weight", "proj")) or leaf == "threshold":
                out.append((f"{prefix}.{name}", p))
    if tower in ("text", "both") and isinstance(getattr(model, "text_projection", None), torch.nn.Parameter):
        out.append(("text_projection", model.text_projection))
    if not out:
        raise UsageError("the model has no weight tensors in the chosen tower")
    return out


@dataclass
class FaultReport:
    """What one injection did: bits flipped per tensor and in total."""

    ber: float
    fmt: str
    seed: int
    flips: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.flips.values()))


def inject_faults(backbone, ber: float, *, fmt: str = "fp32", seed: int = 0, tower: str = "image"):
    """A copy of ``backbone`` with random bit flips in its weights at bit-error rate ``ber``.

    Each tensor of :func:`weight_tensors` gets ``int(numel × bits × ber)`` distinct flips.

    Returns
    -------
    (Backbone, FaultReport)
        The faulty copy (named ``<name>+faults``) and the flip counts; ``backbone`` is
        left unchanged.

    Raises
    ------
    UsageError
        ``ber`` outside [0, 1] or an unknown format or tower.
    """
    if not 0 <= ber <= 1:
        raise UsageError(f"ber must be in [0, 1], got {ber}")
    if fmt not in FORMATS:
        raise UsageError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = copy.deepcopy(backbone.model)
    rng = np.random.default_rng(seed)
    report = FaultReport(ber, fmt, seed)
    with torch.no_grad():
        for name, p in weight_tensors(model, tower):
            n = int(p.numel() * FORMATS[fmt] * ber)
            if n:
                p.copy_(flip_bits(p, n, fmt=fmt, rng=rng))
            report.flips[name] = n
    return backbone.with_model(model, name=f"{backbone.name}+faults"), report


def fault_campaign(backbone, evaluate, bers, *, trials: int = 10, fmt: str = "fp32", seed: int = 0,
                   tower: str = "image", progress: bool | None = None) -> dict:
    """Accuracy under random bit flips, ``trials`` fault maps per bit-error rate.

    Parameters
    ----------
    backbone : Backbone
    evaluate : callable
        ``evaluate(backbone) -> float`` (e.g. zero-shot top-1 on a test set).
    bers : sequence of float
    trials : int, default 10
    fmt, tower : str
        See :func:`inject_faults`.
    seed : int
        Trial ``t`` of rate index ``i`` uses the seed sequence ``[seed, i, t]``.

    Returns
    -------
    dict
        ``{"ber": [...], "mean": [...], "std": [...], "trials": [[...] per ber], "flips": [...],
        "clean": float}``; ``flips`` is the bits flipped per trial.
    """
    bers = [float(b) for b in bers]
    if trials < 1 or not bers:
        raise UsageError("a fault campaign needs at least one bit-error rate and one trial")
    out = {"ber": bers, "mean": [], "std": [], "trials": [], "flips": [], "fmt": fmt, "tower": tower,
           "clean": float(evaluate(backbone))}
    bar = progress_bar(total=len(bers) * trials, desc=f"faults {fmt}", unit="trial", progress=progress)
    for i, ber in enumerate(bers):
        accs, flips = [], 0
        for t in range(trials):
            faulty, report = inject_faults(backbone, ber, fmt=fmt, seed=int(np.random.SeedSequence([seed, i, t])
                                                                                .generate_state(1)[0]), tower=tower)
            accs.append(float(evaluate(faulty)))
            flips = report.total
            bar.update(1)
        out["trials"].append(accs)
        out["mean"].append(float(np.mean(accs)))
        out["std"].append(float(np.std(accs)))
        out["flips"].append(flips)
        logger.info("BER %.1e (%s): %d flips, accuracy %.4f ± %.4f", ber, fmt, flips, out["mean"][-1], out["std"][-1])
    bar.close()
    return out
