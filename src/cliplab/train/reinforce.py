"""Reinforced datasets (MobileCLIP): teacher embeddings stored once, replayed every epoch.

MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (Vasu et al.,
CVPR 2024, arXiv:2311.17049); reference code apple/ml-mobileclip (``training/``: the
``DRClipLoss`` and ``preprocess_dr`` of ``open_clip_v2.patch``, the reproducible
transforms of ``training/dr/transforms.py``).

Writing (:func:`reinforce`, ``cliplab reinforce SRC --teacher M1[,M2] --out SHARDS``)
--------------------------------------------------------------------------------------
For every image of the source (a caption table or WebDataset shards) and every one of
K augmentations ``a``, a random resized crop (box in source pixels) and a horizontal flip
are drawn from ``numpy.random.default_rng([seed, index, a])`` and stored as parameters
(the reference's ``paug.json``); each teacher encodes the augmented image (at the
student's input size ``size``), its real caption and its synthetic captions.  Each sample
of an output shard is ``KEY.png`` (the source image, lossless), ``KEY.txt`` (the real
caption), ``KEY.paug.json`` (``{"param_aug": [K parameter dicts]}``), ``KEY.syn.json``
(``{"syn": [captions]}``) and ``KEY.npz`` (per teacher ``m``: ``image_emb_m`` (K, D_m),
``text_emb_m`` (1, D_m), ``syn_text_emb_m`` (S, D_m), float32, L2-normalised), so the
shards are also plain WebDataset shards any reader takes.

Synthetic captions: the reference captions every image with CoCa.  No captioner is
available offline, so the source's first caption is the real one and its other
captions stand in for the synthetic ones; on ShapesWorld these are the scene's other
rewrites (paraphrases of one ground truth, not a captioner's noisier text).  An item with
one caption uses it as its synthetic caption too.

Shards are written whole (:func:`cliplab.data.sources.write_webdataset_shard`) and each
is followed by a marker ``shard-N.done``; a run killed at any point and started again
with the same command redoes only unfinished shards and ends with the bytes of an
uninterrupted run (teacher embeddings are computed per shard, in the same batches).
``manifest.json`` records the teachers (fingerprints), the options and the source
length; a rerun with other ones is refused.

Reading (:class:`ReinforcedSet`)
--------------------------------
The Trainer's training set: at step ``t`` item ``i`` draws its augmentation index and
its synthetic caption from ``default_rng([seed, 3, t, i])``, replays the stored
parameters (bit-exactly the image the teachers saw) and returns the stored embeddings of
that augmentation, of the real caption and of the chosen synthetic caption as
``extras["teacher"]``, and the synthetic caption as ``extras["extra_captions"]``.  No
teacher runs at training time.

Deviations from the reference: no RandAugment (colour and geometry operations would
change what ShapesWorld captions name); the flip probability defaults to 0 (the
captions name left and right); the crop scale defaults to (0.5, 1) rather than
torchvision's (0.08, 1) (64-pixel scenes of small objects); teachers are stored per
member (``image_emb_0``, ``image_emb_1``...) rather than concatenated.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._progress import progress_bar
from ..errors import DataError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["ReinforceResult", "ReinforcedSet", "apply_augmentation", "is_reinforced", "reinforce",
           "sample_augmentation"]

FORMAT = "cliplab-reinforced/1"
"""``format`` of ``SHARDS/manifest.json``."""

_AUG_STREAM = 3  # domain tag of the per-step augmentation and synthetic-caption choice
_SHARD_RE = re.compile(r"^shard-(\d+)\.done$")
_JOB_KEYS = ("teachers", "augmentations", "size", "scale", "ratio", "flip", "seed", "shard_size", "n_items")


# ------------------------------------------------------------------ augmentations
def sample_augmentation(rng: np.random.Generator, height: int, width: int, *, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3), flip: float = 0.0) -> dict:
    """Draw one random-resized-crop box and flip, as torchvision's ``RandomResizedCrop.get_params``.

    Parameters
    ----------
    rng : numpy.random.Generator
    height, width : int
        Size of the source image.
    scale : (float, float), default (0.5, 1.0)
        Range of the crop's area as a fraction of the image's.
    ratio : (float, float), default (3/4, 4/3)
        Range of the crop's aspect ratio (log-uniform).
    flip : float, default 0.0
        Probability of a horizontal flip.

    Returns
    -------
    dict
        ``{"box": [left, top, right, bottom], "flip": bool}``, integers in source pixels
        (10 draws, then the centre crop of the clamped ratio, as torchvision does).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = [left, top, left + w, top + h]
            break
    if box is None:  # fallback: central crop
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        box = [left, top, left + w, top + h]
    return {"box": box, "flip": bool(rng.random() < flip)}


def apply_augmentation(image: np.ndarray, params: dict, size: int) -> np.ndarray:
    """Replay stored augmentation parameters: crop ``box``, resize to ``size`` (bicubic), flip.

    Parameters
    ----------
    image : numpy.ndarray of shape (H, W, 3), uint8
    params : dict
        As :func:`sample_augmentation` returns (or read back from a shard).
    size : int
        Output side in pixels.

    Returns
    -------
    numpy.ndarray of shape (size, size, 3), uint8
        A pure function of its inputs (PIL's fixed-point resampling): the same
        parameters give the same bytes.
    """
    from PIL import Image

    out = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC, box=tuple(float(v) for v in params["box"]))
    if params.get("flip"):
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


# ------------------------------------------------------------------------ writing
@dataclass
class ReinforceResult:
    """What :func:`reinforce` did.

    Attributes
    ----------
    out : Path
    n_items : int
        Source items (one sample each).
    n_shards : int
    n_resumed : int
        Shards finished by an earlier run (not recomputed).
    shards : list of Path
    """

    out: Path
    n_items: int
    n_shards: int
    n_resumed: int
    shards: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.n_items} items in {self.n_shards} shard(s) at {self.out}"
                + (f" ({self.n_resumed} already done)" if self.n_resumed else ""))


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image, np.uint8)
    return np.asarray(image.convert("RGB"), np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _shard_path(out: Path, shard: int, suffix: str) -> Path:
    return out / f"shard-{shard:05d}{suffix}"


def _split_captions(captions: list[str]) -> tuple[str, list[str]]:
    """The real caption and the synthetic ones (the others, or the real one again)."""
    return captions[0], list(captions[1:]) or [captions[0]]


def reinforce(data, teachers, out, *, augmentations: int = 5, size: int | None = None,
              scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.0, seed: int = 0,
              shard_size: int = 1000, batch_size: int = 256, progress: bool | None = None) -> ReinforceResult:
    """Write a reinforced dataset: K stored augmentations and teacher embeddings per image.

    Parameters
    ----------
    data : map-style dataset or str or Path
        Items ``(image, captions)`` (captions[0] the real caption, the others its
        synthetic ones); a path is read as ``cliplab train --data`` reads it
        (caption table or WebDataset shards).
    teachers : sequence of Backbone or str
        The teacher ensemble (model specs are loaded with :func:`cliplab.models.load`).
    out : str or Path
        Output folder (created).
    augmentations : int, default 5
        K, augmentations stored per image.
    size : int, optional
        Side of the augmented images (the student's input size); default: the first
        teacher's image size.
    scale, ratio, flip
        Of :func:`sample_augmentation`.
    seed : int, default 0
        Augmentation parameters of item i are drawn from ``default_rng([seed, i, a])``.
    shard_size : int, default 1000
        Samples per shard: the most work an interruption loses.
    batch_size : int, default 256
        Teacher batch size.
    progress : bool, optional

    Returns
    -------
    ReinforceResult

    Raises
    ------
    UsageError
        Bad options; ``out`` holds a run with other teachers or options.
    DataError
        An empty source, an item without caption.
    """
    from ..data.sources import write_webdataset_shard
    from ..models.loading import load

    out = Path(out)
    if int(augmentations) < 1 or int(shard_size) < 1 or int(batch_size) < 1:
        raise UsageError("augmentations, shard_size and batch_size must be >= 1")
    if not 0.0 <= float(flip) <= 1.0:
        raise UsageError(f"flip is a probability in [0, 1], got {flip}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise UsageError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if isinstance(data, (str, Path)):
        from .recipes import _data_set

        data = _data_set(data)
    teachers = [load(t) if isinstance(t, (str, Path)) else t for t in teachers]
    if not teachers:
        raise UsageError("give at least one teacher")
    n = len(data)
    if n < 1:
        raise DataError("the source holds no item")
    size = int(size or teachers[0].image_size)
    manifest = {"format": FORMAT, "teachers": [{"name": t.name, "fingerprint": t.fingerprint, "dim": t.embed_dim}
                                               for t in teachers],
                "augmentations": int(augmentations), "size": size, "scale": [float(s) for s in scale],
                "ratio": [float(r) for r in ratio], "flip": float(flip), "seed": int(seed),
                "shard_size": int(shard_size), "n_items": n, "n_shards": math.ceil(n / shard_size)}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{manifest_path}: unreadable manifest; remove {out} and run again") from None
        for key in _JOB_KEYS:
            if old.get(key) != manifest.get(key):
                raise UsageError(f"{out} holds a reinforced set with another {key} ({old.get(key)!r}, now "
                                 f"{manifest.get(key)!r}); rerun with the same teachers and options, or use "
                                 "another --out")
    else:  # written whole (temporary file, then renamed), like the shards
        tmp = manifest_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        tmp.replace(manifest_path)
    n_shards = manifest["n_shards"]
    done = {int(m.group(1)) for p in out.iterdir() if (m := _SHARD_RE.match(p.name))
            and _shard_path(out, int(m.group(1)), ".tar").is_file()}
    for p in out.glob(".shard-*.tar.tmp-*"):  # left by a killed run
        p.unlink(missing_ok=True)
    bar = progress_bar(total=n, desc="reinforce", unit="img", progress=progress)
    bar.update(sum(min(shard_size, n - s * shard_size) for s in done if s < n_shards))
    for shard in range(n_shards):
        if shard in done:
            continue
        lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
        samples = _reinforce_shard(data, range(lo, hi), teachers, manifest, batch_size)
        write_webdataset_shard(_shard_path(out, shard, ".tar"), samples)
        _shard_path(out, shard, ".done").write_text(json.dumps({"shard": shard, "items": hi - lo}),
                                                    encoding="utf-8")
        bar.update(hi - lo)
    bar.close()
    return ReinforceResult(out, n, n_shards, len(done & set(range(n_shards))),
                           [_shard_path(out, s, ".tar") for s in range(n_shards)])


def _reinforce_shard(data, indices, teachers, manifest: dict, batch_size: int) -> list:
    """The samples ``(key, {ext: bytes})`` of one shard."""
    k, size = manifest["augmentations"], manifest["size"]
    items = []
    for i in indices:
        image, captions, *_ = data[i]
        if not captions:
            raise DataError(f"item {i} has no caption")
        image = _as_rgb_array(image)
        params = [sample_augmentation(np.random.default_rng([manifest["seed"], i, a]), *image.shape[:2],
                                      scale=manifest["scale"], ratio=manifest["ratio"], flip=manifest["flip"])
                  for a in range(k)]
        real, syn = _split_captions(list(captions))
        items.append((i, image, params, real, syn))
    views = np.stack([apply_augmentation(image, p, size) for _, image, params, _, _ in items
                      for p in params])                                                  # (n*K, S, S, 3)
    texts = [t for *_, real, syn in items for t in [real, *syn]]
    arrays = [{} for _ in items]
    for m, teacher in enumerate(teachers):
        img = teacher.encode_images(views, batch_size=batch_size, progress=False).features  # (n*K, D)
        txt = teacher.encode_texts(texts, batch_size=batch_size)                               # (n_texts, D)
        img = img.reshape(len(items), k, -1)
        pos = 0
        for j, (*_, syn) in enumerate(items):
            arrays[j][f"image_emb_{m}"] = np.ascontiguousarray(img[j], np.float32)           # (K, D)
            arrays[j][f"text_emb_{m}"] = np.ascontiguousarray(txt[pos:pos + 1], np.float32)  # (1, D)
            arrays[j][f"syn_text_emb_{m}"] = np.ascontiguousarray(txt[pos + 1:pos + 1 + len(syn)], np.float32)
            pos += 1 + len(syn)
    return [(f"{i:09d}", {"png": _png(image), "txt": real.encode("utf-8"),
                          "paug.json": json.dumps({"param_aug": params}).encode("utf-8"),
                          "syn.json": json.dumps({"syn": syn}, ensure_ascii=False).encode("utf-8"),
                          "npz": _npz(arrays[j])})
            for j, (i, image, params, real, syn) in enumerate(items)]


# ------------------------------------------------------------------------ reading
def is_reinforced(path) -> bool:
    """Whether ``path`` is a folder written by :func:`reinforce`."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except ValueError:
        return False


class ReinforcedSet:
    """A reinforced dataset as the Trainer's training set (see the module docstring).

    Parameters
    ----------
    path : str or Path
        A folder written by :func:`reinforce` (every shard finished).
    seed : int, default 0
        Seeds the per-step choice of augmentation and synthetic caption.

    Attributes
    ----------
    size : int
        Side of the replayed images.
    n_teachers : int
    augmentations : int

    Items
    -----
    ``set.at_step(t)[i]`` is ``(image (size, size, 3) uint8, [real caption],
    {"teacher": {"image_m": (D_m,), "text_m": (D_m,), "syn_text_m": (D_m,)},
    "extra_captions": [synthetic caption]})`` for every teacher m; ``set[i]`` is the
    item at step 0.  The Trainer calls ``at_step`` for every step.

    Raises
    ------
    DataError
        Not a reinforced folder, unfinished shards, damaged samples.

    Notes
    -----
    The augmentation parameters, synthetic captions and embeddings (K + 1 + S vectors
    per image and teacher) are read into memory once; images are read from the shards
    by byte offset when an item is loaded.
    """

    def __init__(self, path, *, seed: int = 0):
        from ..data.sources import WebDatasetSet, index_webdataset

        self.path = Path(path)
        if not is_reinforced(self.path):
            raise DataError(f"{self.path}: not a reinforced dataset (no manifest.json of cliplab reinforce)")
        self.manifest = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        n_shards = int(self.manifest["n_shards"])
        shards = [_shard_path(self.path, s, ".tar") for s in range(n_shards)]
        missing = [s for s in range(n_shards) if not _shard_path(self.path, s, ".done").is_file()]
        if missing:
            raise DataError(f"{self.path}: {len(missing)} of {n_shards} shards not finished (first: {missing[0]}); "
                            "rerun the same cliplab reinforce command to finish them")
        self.seed = int(seed)
        self.size = int(self.manifest["size"])
        self.augmentations = int(self.manifest["augmentations"])
        self.n_teachers = len(self.manifest["teachers"])
        self._images = WebDatasetSet(index_webdataset(shards))
        self.params, self.synthetic, self.emb = [], [], []
        for shard in shards:
            self._read_extras(shard)
        if len(self.params) != len(self._images):
            raise DataError(f"{self.path}: {len(self._images)} images but {len(self.params)} reinforcement records")

    def _read_extras(self, shard: Path) -> None:
        with tarfile.open(shard, "r:") as tar:
            record: dict = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext not in ("paug.json", "syn.json", "npz"):
                    continue
                data = tar.extractfile(member).read()
                record[ext] = data
                if len(record) == 3:
                    npz = np.load(io.BytesIO(record["npz"]))
                    self.params.append(json.loads(record["paug.json"])["param_aug"])
                    self.synthetic.append(json.loads(record["syn.json"])["syn"])
                    self.emb.append({name: npz[name] for name in npz.files})
                    record = {}

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int):
        return self.item(int(index), 0)

    def at_step(self, step: int) -> "_StepView":
        """The set as step ``step`` sees it (what the Trainer loads from)."""
        return _StepView(self, int(step))

    def choice(self, index: int, step: int) -> tuple[int, int]:
        """``(augmentation index, synthetic caption index)`` of item ``index`` at ``step``."""
        rng = np.random.default_rng([self.seed, _AUG_STREAM, step, index])
        return int(rng.integers(self.augmentations)), int(rng.integers(len(self.synthetic[index])))

    def item(self, index: int, step: int):
        """Item ``index`` at ``step``: the replayed augmentation and its stored teacher embeddings."""
        image, captions = self._images[index]
        a, s = self.choice(index, step)
        view = apply_augmentation(np.asarray(image, np.uint8), self.params[index][a], self.size)  # (S, S, 3)
        emb = self.emb[index]
        teacher = {}
        for m in range(self.n_teachers):
            teacher[f"image_{m}"] = emb[f"image_emb_{m}"][a]              # (D_m,)
            teacher[f"text_{m}"] = emb[f"text_emb_{m}"][0]                # (D_m,)
            teacher[f"syn_text_{m}"] = emb[f"syn_text_emb_{m}"][s]        # (D_m,)
        return view, [captions[0]], {"teacher": teacher, "extra_captions": [self.synthetic[index][s]]}


class _StepView:
    """:class:`ReinforcedSet` at one step: items replay that step's augmentations."""

    def __init__(self, base: ReinforcedSet, step: int):
        self.base, self.step = base, step

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base.item(int(index), self.step)
