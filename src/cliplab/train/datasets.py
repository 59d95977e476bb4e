"""Training sets of the Trainer and the deterministic batch order.

A training set is any map-style dataset (``len(ds)``, ``ds[i]``) whose items
are ``(image, captions)`` (:class:`ShapesTrainSet` here; caption tables and
WebDataset shards through :class:`cliplab.data.sources.CaptionTableSet` and
:class:`cliplab.data.sources.WebDatasetSet`): ``image`` an RGB ``uint8`` array of shape (H, W, 3)
or a PIL image, ``captions`` a non-empty list of strings (several phrasings of
one caption, LaCLIP-style).  A set may also offer
``get_batch(indices) -> (images, captions_lists)`` to load many items at once.

The data a step sees is a pure function of ``(seed, step)``:
:func:`global_batch_indices` walks through one permutation per epoch and
:func:`caption_choice` picks one caption per sample.  Resumed and
data-parallel runs therefore see exactly the batches of a single
uninterrupted run.
"""

from __future__ import annotations

import abc

from functools import lru_cache
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


# Domain tags keep the streams of the batch order and the caption choice apart.
_ORDER_STREAM = 0
_CAPTION_STREAM = 1


@runtime_checkable
class ImageTextDataset(Protocol):
    """Map-style dataset of ``(image, captions)`` items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int): ...


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Dataset indices of the global batch of ``step`` (a pure function).

    Sample ``p = step * batch_size + j`` of the stream is element
    ``p mod n`` of epoch ``p // n``'s permutation, drawn from
    ``np.random.default_rng([seed, 0, epoch])``; batches may straddle epochs.

    Parameters
    ----------
    n : int
        Dataset length.
    batch_size : int
        Global batch size.
    seed, step : int

    Returns
    -------
    numpy.ndarray of shape (batch_size,), int64
    """
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = _epoch_permutation(n, seed, int(epoch))[offsets[mask]]
    return out


def caption_choice(n_captions: Sequence[int], seed: int, step: int, start: int = 0) -> list[int]:
    """Which caption each sample of a step uses (LaCLIP: uniform over phrasings).

    Sample ``start + j`` of the global batch of ``step`` takes caption
    ``floor(u_j * n_captions[j])`` with ``u`` uniform from
    ``np.random.default_rng([seed, 1, step])``.  A rank holding the slice
    starting at ``start`` gets the same choices as one process.
    """
    u = np.random.default_rng([seed, _CAPTION_STREAM, step]).random(start + len(n_captions))[start:]
    return [min(int(x * k), k - 1) for x, k in zip(u, n_captions)]


SHAPES_CAPTIONS = ("scene", "noisy", "recaptioned")
"""The caption kinds of :class:`ShapesTrainSet`."""


class SceneItems(abc.ABC):
    """The first ``n`` scenes of a ShapesWorld split, as training items a subclass builds.

    A subclass defines :meth:`items`, what each scene contributes besides its image;
    ``ds[i]`` and ``ds.get_batch(indices)`` (one render call) are built from it.  Used by the
    Long-CLIP set, VladVA's and SoftPromptComp's.

    Parameters
    ----------
    world : cliplab.data.shapes.ShapesWorld
    split : str, default "train"
    n : int, optional
        Use the first ``n`` scenes of the split (default: all of them).
    """

    def __init__(self, world, split: str = "train", n: int | None = None):
        self.world, self.split = world, split
        total = len(world.split(split))
        self.n = total if n is None else min(int(n), total)

    @abc.abstractmethod
    def items(self, scenes) -> tuple[list, list[dict]]:
        """``(captions, extras)`` of ``scenes``: per scene its caption list (or None) and its extras dict."""

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        scene = self.world.scene(self.split, int(index))
        captions, extras = self.items([scene])
        return scene.image, captions[0], extras[0]

    def get_batch(self, indices):
        """``(uint8 images (N, H, W, 3), captions, extras)`` in one render call."""
        images, scenes = self.world.render_batch(self.split, [int(i) for i in indices])
        captions, extras = self.items(scenes)
        return images, captions, extras


class ShapesTrainSet:
    """A ShapesWorld split as a training set.

    Parameters
    ----------
    world : cliplab.data.shapes.ShapesWorld
    split : str, default "train"
    negatives : int, default 0
        With K > 0, every item carries K hard-negative captions, the canonical
        caption with one colour or shape swapped
        (:func:`cliplab.data.shapes.captions.negative_captions`; never a held-out
        composition in ``train``/``val``), as ``extras["extra_captions"]``.
    tags : bool, default False
        Every item carries its colour and shape words as a multi-hot float32
        vector over :data:`cliplab.data.shapes.TAGS`, as ``extras["targets"]["tags"]``.
    languages : tuple of {"en", "zh"}, default ("en",)
        The caption languages of an item: its English captions, its Chinese ones
        (:attr:`~cliplab.data.shapes.Scene.captions_zh`), or both in one list (a
        trainer then picks a language and a phrasing per step).
    parallel : bool, default False
        Every item carries its canonical English caption as ``extras["extra_captions"]``,
        the parallel caption of DC-CLIP's stage 1 (:class:`cliplab.train.distill.DCCLIPStage1`).
    captions : {"scene", "noisy", "recaptioned"}, default "scene"
        What each item says about its image: the scene's phrasings (its canonical
        caption and rewrites), one alt-text-like caption
        (:func:`cliplab.data.shapes.alt_text.corrupt_caption` at ``noise``, never a
        held-out composition in ``train``/``val``), or only the canonical caption
        written from the ground truth (re-captioning).
    noise : NoiseRates, optional
        The corruption rates of ``captions="noisy"`` (default: ``NoiseRates()``).

    Items are ``(image, captions)``, or ``(image, captions, extras)`` with either
    option (what objectives such as ``hqclip`` read).  The negatives of scene i
    are a pure function of ``(world.seed, split, i)``.

    Examples
    --------
    >>> from cliplab.data.shapes import ShapesWorld          # doctest: +SKIP
    >>> ds = ShapesTrainSet(ShapesWorld(seed=0), "train")    # doctest: +SKIP
    >>> image, captions = ds[0]                              # doctest: +SKIP
    """

    def __init__(self, world, split: str = "train", *, negatives: int = 0, tags: bool = False,
                 languages: tuple = ("en",), parallel: bool = False, captions: str = "scene", noise=None):
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        if not languages or set(languages) - {"en", "zh"}:
            raise ValueError(f"languages must be a non-empty subset of ('en', 'zh'), got {languages!r}")
        if parallel and negatives:
            raise ValueError("parallel captions and negatives both use the extra captions; choose one")
        if captions not in SHAPES_CAPTIONS:
            raise ValueError(f"captions must be one of {', '.join(SHAPES_CAPTIONS)}, got {captions!r}")
        if captions != "scene" and "zh" in languages:
            raise ValueError(f"captions={captions!r} is English only; Chinese captions are the scenes' own")
        if negatives and (captions == "noisy" or tuple(languages) != ("en",)):
            # negatives swap one attribute of the canonical English caption: against a noisy caption
            # (which may carry that very swap) or a Chinese one they are not hard negatives
            raise ValueError("hard negatives go with the scenes' own or re-written English captions only, not noisy ones")
        self.world = world
        self.split = split
        self.negatives = int(negatives)
        self.tags = bool(tags)
        self.languages = tuple(languages)
        self.parallel = bool(parallel)
        self.captions = captions
        self.noise = noise
        self._scenes = world.split(split)

    def _captions(self, scene) -> list[str]:
        return [c for lang in self.languages for c in (self._english(scene) if lang == "en" else scene.captions_zh)]

    @property
    def _has_extras(self) -> bool:
        return bool(self.negatives or self.tags or self.parallel)

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int):
        scene = self._scenes[int(index)]
        if not self._has_extras:
            return scene.image, self._captions(scene)
        return scene.image, self._captions(scene), self._extras(scene)

    def get_batch(self, indices):
        """``(uint8 array (N, H, W, 3), list of caption lists[, list of extras])`` in one render call."""
        images, scenes = self.world.render_batch(self.split, [int(i) for i in indices])
        captions = [self._captions(s) for s in scenes]
        if not self._has_extras:
            return images, captions
        return images, captions, [self._extras(s) for s in scenes]

    def _english(self, scene) -> list[str]:
        if self.captions == "scene":
            return list(scene.captions)
        from ..data.shapes.captions import canonical_caption

        if self.captions == "recaptioned":
            return [canonical_caption(scene.objects)]
        from ..data.shapes import COLORS
        from ..data.shapes.alt_text import NoiseRates, corrupt_caption
        from ..data.shapes.world import SPLIT_IDS

        rng = np.random.default_rng([self.world.seed, SPLIT_IDS[self.split], scene.index, 3])  # own stream
        avoid = set(self.world.heldout) if self.split in ("train", "val") else set()
        noisy = corrupt_caption(scene.objects, rng, colors=COLORS, shapes=self.world.shapes_of(self.split),
                                rates=self.noise or NoiseRates(), avoid=avoid)
        return [noisy.text]

    def _extras(self, scene) -> dict:
        from ..data.shapes import COLORS, TAGS
        from ..data.shapes.captions import negative_captions
        from ..data.shapes.world import SPLIT_IDS

        out = {}
        if self.parallel:
            out["extra_captions"] = [scene.captions[0]]
        if self.negatives:
            rng = np.random.default_rng([self.world.seed, SPLIT_IDS[self.split], scene.index, 2])  # own stream
            avoid = set(self.world.heldout) if self.split in ("train", "val") else set()
            out["extra_captions"] = negative_captions(scene.objects, rng, self.negatives, COLORS,
                                                      self.world.shapes_of(self.split), avoid)
        if self.tags:
            words = {o.color for o in scene.objects} | {o.shape for o in scene.objects}
            out["targets"] = {"tags": np.array([t in words for t in TAGS], dtype=np.float32)}  # (V,)
        return out


class ConcatSet:
    """Several training sets one after another (e.g. a mixture of scene kinds).

    Item ``i`` comes from the first set whose cumulative length exceeds ``i``;
    with uniform batch sampling, each set's share of the batches is its share
    of the total length.
    """

    def __init__(self, *sets):
        if not sets:
            raise ValueError("ConcatSet needs at least one set")
        self.sets = sets
        self.offsets = np.cumsum([0] + [len(s) for s in sets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return k, int(index - self.offsets[k])

    def __getitem__(self, index: int):
        k, i = self._locate(int(index))
        return self.sets[k][i]

    def get_batch(self, indices):
        """Load per member set (with its own ``get_batch`` when it has one), in the given order.

        Returns ``(images, captions)``, or ``(images, captions, extras)`` when the
        members' items carry extras.
        """
        located = [self._locate(int(i)) for i in indices]
        images, captions, extras = [None] * len(located), [None] * len(located), [None] * len(located)
        for k, member in enumerate(self.sets):
            pos = [j for j, (kk, _) in enumerate(located) if kk == k]
            if not pos:
                continue
            local = [located[j][1] for j in pos]
            if hasattr(member, "get_batch"):
                imgs, caps, *more = member.get_batch(local)
            else:
                imgs, caps, *more = zip(*(member[i] for i in local))
            for n, (j, im, c) in enumerate(zip(pos, imgs, caps)):
                images[j], captions[j] = im, list(c)
                extras[j] = more[0][n] if more else None
        if all(e is None for e in extras):
            return images, captions
        return images, captions, extras


class RewrittenSet:
    """A training set whose captions are extended with LaCLIP rewrites.

    Item ``i`` is the item of ``base`` with its captions followed by ``n`` rewrites
    of each (:func:`cliplab.data.rewrites.add_rewrites`, deterministic by ``seed``);
    the Trainer then draws one phrasing per image per step, uniformly, as LaCLIP does.
    Extras (negatives, tags) pass through.

    Parameters
    ----------
    base : map-style dataset of ``(image, captions[, extras])``
    n : int, default 4
        Rewrites per caption (LaCLIP: 4).
    seed : int, default 0
    """

    def __init__(self, base, n: int = 4, *, seed: int = 0):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.base, self.n, self.seed = base, int(n), int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _rewrite(self, captions) -> list[str]:
        from ..data.rewrites import add_rewrites

        return add_rewrites(list(captions), self.n, seed=self.seed)

    def __getitem__(self, index: int):
        image, captions, *extras = self.base[index]
        return (image, self._rewrite(captions), *extras)

    def get_batch(self, indices):
        """The base set's batch (its own ``get_batch`` when it has one) with rewritten captions."""
        if hasattr(self.base, "get_batch"):
            images, captions, *extras = self.base.get_batch(indices)
        else:
            images, captions, *extras = zip(*(self.base[int(i)] for i in indices))
        return (list(images), [self._rewrite(c) for c in captions], *extras)
