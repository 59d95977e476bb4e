"""Encoding speed: cliplab's fast text path and image pipeline against what users would
otherwise run.

Every contender runs once per round, in an order rotated each round, and ratios are
taken within a round (median and min-max over ``--rounds``); see ``_interleave.py``.
All run in this one process (no interpreter start-up counted), with torch's default
threads in the main process.

- text: ``Backbone.encode_texts`` vs open_clip ``encode_text`` on 1,000 short prompts
  (random-init ViT-B-32, context 77), and their largest feature difference;
- images, ``--n`` photo-like 1024x768 JPEG files, batches of 32, for ViT-B-32 (random
  weights) and the 64 px shapes-tiny model (where decoding dominates):

  ``model_only``     the model's ``encode_image`` on tensors preprocessed beforehand (no decode);
  ``plain``          one process: PIL open -> ``convert("RGB")`` -> open_clip preprocess ->
                     ``torch.stack`` -> ``encode_image``;
  ``dataloader``     the stock pipeline: ``torch.utils.data.DataLoader`` with 2 worker
                     processes (started each run) doing the same PIL decode + open_clip
                     preprocess, default collate, ``encode_image`` in the main process;
  ``cliplab``        ``Backbone.encode_images`` (exact decode; safe decoding, its worker
                     processes started each run, L2-normalised NumPy features);
  ``cliplab_threads`` the same with ``parallel="threads"`` (the design alternative);
  ``cliplab_draft``  the same with ``draft=True`` (reduced-scale JPEG decode).

  plus the cosine between draft and exact features.

Usage: python benchmarks/encode.py [--n 200] [--rounds 3] [--quick]
Writes benchmarks/results/encode.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

import cliplab
from cliplab.models.backbone import Backbone
from cliplab.models.loading import build_model, default_preprocess_cfg, make_tokenizer

from _interleave import fmt, interleave, ratio, rates

RESULTS = Path(__file__).parent / "results"
TINY64 = {"embed_dim": 128,
          "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}


def wrap(model, cfg, name):
    return Backbone(model, model_cfg=cfg, preprocess_cfg=default_preprocess_cfg(cfg),
                    tokenizer=make_tokenizer(cfg), name=name)


def vit_b32():
    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-32")
    return wrap(build_model(cfg), cfg, "ViT-B-32 (random)")


def tiny64():
    try:
        return cliplab.load("shapes-tiny")
    except cliplab.ModelLoadError:
        torch.manual_seed(0)
        return wrap(build_model(TINY64), TINY64, "tiny-64px (random)")


def bench_text(bb, rounds: int, n: int = 1000, batch_size: int = 256) -> dict:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    prompts = [f"a photo of a {IMAGENET_CLASSNAMES[i % 1000]}." for i in range(n)]
    tokens = bb.tokenize(prompts)
    model = bb.model

    @torch.inference_mode()
    def reference():
        return torch.cat([model.encode_text(tokens[i:i + batch_size]) for i in range(0, n, batch_size)])

    def ours():
        return bb.encode_texts(prompts, batch_size=batch_size, progress=False)

    diff = float(np.abs(ours() - torch.nn.functional.normalize(reference(), dim=-1).numpy()).max())
    times = interleave({"open_clip_encode_text": reference, "cliplab_encode_texts": ours}, rounds)
    return {"model": bb.name, "prompts": n, "times_s": times, "per_s": rates(times, n),
            "speedup": ratio(times, "cliplab_encode_texts", "open_clip_encode_text"),
            "max_abs_diff": diff, "mean_tokens": float((tokens.argmax(-1) + 1).float().mean()),
            "includes": "tokenising + text tower, both; cliplab also sorts by length and L2-normalises"}


def make_jpegs(folder: Path, n: int) -> list[Path]:
    """Photo-like 1024x768 JPEGs: smooth colour fields with noise (about 100-200 kB each)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.random((12, 16, 3)) * 255
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((1024, 768), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, img.shape)
        paths.append(folder / f"photo_{i:04d}.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


class _PlainFiles(torch.utils.data.Dataset):
    """The stock dataset: PIL open -> convert("RGB") -> open_clip preprocess."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(Image.open(self.paths[i]).convert("RGB"))


def bench_images(bb, paths: list[Path], rounds: int, batch_size: int = 32) -> dict:
    model, preprocess = bb.model, bb.preprocess
    dataset = _PlainFiles(paths, preprocess)

    @torch.inference_mode()
    def plain(files=paths):
        for i in range(0, len(files), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in files[i:i + batch_size]])
            model.encode_image(batch)

    @torch.inference_mode()
    def dataloader(ds=dataset):
        for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=2):
            model.encode_image(batch)

    tensors = torch.stack([dataset[i] for i in range(len(paths))])

    @torch.inference_mode()
    def model_only(n=len(paths)):
        for i in range(0, n, batch_size):
            model.encode_image(tensors[i:i + batch_size])

    def features(files=paths, **kw):
        return bb.encode_images(files, batch_size=batch_size, progress=False, **kw).features

    cliplab = features

    few = paths[:2 * batch_size]
    warmup = {"model_only": lambda: model_only(len(few)), "plain": lambda: plain(few),
              "dataloader": lambda: dataloader(_PlainFiles(few, preprocess)),
              "cliplab": lambda: cliplab(few, parallel="processes")}
    contenders = {"model_only": model_only, "plain": plain, "dataloader": dataloader,
                  "cliplab": cliplab, "cliplab_threads": lambda: cliplab(parallel="threads"),
                  "cliplab_draft": lambda: cliplab(draft=True)}
    exact, draft = features(), features(draft=True)
    times = interleave(contenders, rounds, warmup)
    cos = (exact * draft).sum(1)
    versus = {f"{a}_vs_{b}": ratio(times, a, b) for a, b in [
        ("cliplab", "model_only"), ("cliplab", "dataloader"), ("cliplab", "plain"),
        ("cliplab", "cliplab_threads"), ("cliplab_draft", "model_only"), ("cliplab_draft", "dataloader"),
        ("cliplab_draft", "plain"), ("dataloader", "plain")]}
    return {"model": bb.name, "images": len(paths), "batch_size": batch_size, "times_s": times,
            "img_per_s": rates(times, len(paths)), **versus,
            "draft_cosine_mean": float(cos.mean()), "draft_cosine_min": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of JPEG files")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="64 files, 200 prompts, 3 rounds (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.prompts, args.rounds = 64, 200, 3
    os.environ.setdefault("CLIPLAB_PROGRESS", "0")
    big, small = vit_b32(), tiny64()
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "load_avg_before": os.getloadavg()},
              "rounds": args.rounds, "text": bench_text(big, args.rounds, n=args.prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        result["images_tiny64"] = bench_images(small, paths, args.rounds)
        result["images_vit_b32"] = bench_images(big, paths, args.rounds)
    result["machine"]["load_avg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "encode.json").write_text(json.dumps(result, indent=2))
    t = result["text"]
    print(f"text: cliplab encode_texts vs open_clip encode_text {fmt(t['speedup'])}, "
          f"max diff {t['max_abs_diff']:.1e} ({args.prompts} prompts, {args.rounds} rounds)")
    for key in ("images_tiny64", "images_vit_b32"):
        r = result[key]
        print(f"{r['model']}, {r['images']} JPEGs 1024x768, img/s "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["img_per_s"].items()))
        for name in ("cliplab_vs_model_only", "cliplab_vs_dataloader", "cliplab_vs_plain",
                     "cliplab_vs_cliplab_threads", "cliplab_draft_vs_dataloader",
                     "cliplab_draft_vs_model_only", "dataloader_vs_plain"):
            print(f"  {name}: {fmt(r[name])}")
        print(f"  draft vs exact cosine: mean {r['draft_cosine_mean']:.5f}, min {r['draft_cosine_min']:.5f}")


if __name__ == "__main__":
    main()
