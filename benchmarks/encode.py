"""Encoding speed: cliplab's fast text path and image pipeline against plain open_clip.

Measures, as ratios within one run (medians of ``--repeats`` runs):

- text: ``Backbone.encode_texts`` vs open_clip ``encode_text`` on 1,000 short prompts
  (random-init ViT-B-32, context 77), and their largest feature difference;
- images from JPEG files (``--n`` photo-sized 1024x768 files): cliplab ``encode_images``
  (exact and draft decode), a plain open_clip loop (PIL open -> preprocess ->
  ``encode_image`` in batches) and model-only forward on pre-made tensors, for
  ViT-B-32 and for a tiny 64 px model (where decoding dominates); plus the cosine
  between draft-decoded and exact features.

Usage: python benchmarks/encode.py [--n 200] [--repeats 3] [--quick]
Writes benchmarks/results/encode.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

import cliplab
from cliplab.models.backbone import Backbone
from cliplab.models.loading import build_model, default_preprocess_cfg, make_tokenizer

RESULTS = Path(__file__).parent / "results"
TINY64 = {"embed_dim": 128,
          "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def bench_text(bb, repeats: int, n: int = 1000, batch_size: int = 256) -> dict:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    prompts = [f"a photo of a {IMAGENET_CLASSNAMES[i % 1000]}." for i in range(n)]
    tokens = bb.tokenize(prompts)
    model = bb.model

    @torch.inference_mode()
    def reference():
        return torch.cat([model.encode_text(tokens[i:i + batch_size]) for i in range(0, n, batch_size)])

    ref = torch.nn.functional.normalize(reference(), dim=-1).numpy()
    ours = bb.encode_texts(prompts, batch_size=batch_size, progress=False)
    t_ref = median_time(reference, repeats)
    t_ours = median_time(lambda: bb.encode_texts(prompts, batch_size=batch_size, progress=False), repeats)
    return {"model": bb.name, "prompts": n, "open_clip_s": t_ref, "cliplab_s": t_ours,
            "speedup": t_ref / t_ours, "max_abs_diff": float(np.abs(ours - ref).max()),
            "mean_tokens": float((tokens.argmax(-1) + 1).float().mean())}


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


def bench_images(bb, paths: list[Path], repeats: int, batch_size: int = 32) -> dict:
    model, preprocess = bb.model, bb.preprocess

    @torch.inference_mode()
    def plain_loop():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            model.encode_image(batch)

    tensors = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])

    @torch.inference_mode()
    def model_only():
        for i in range(0, len(paths), batch_size):
            model.encode_image(tensors[i:i + batch_size])

    exact = bb.encode_images(paths, batch_size=batch_size, progress=False).features
    draft = bb.encode_images(paths, batch_size=batch_size, progress=False, draft=True).features
    model_only(), plain_loop()  # every path warmed once before timing
    t = {
        "model_only_s": median_time(model_only, repeats),
        "plain_open_clip_s": median_time(plain_loop, repeats),
        "cliplab_exact_s": median_time(lambda: bb.encode_images(paths, batch_size=batch_size, progress=False), repeats),
        "cliplab_draft_s": median_time(lambda: bb.encode_images(paths, batch_size=batch_size, progress=False,
                                                                draft=True), repeats),
    }
    n = len(paths)
    cos = (exact * draft).sum(1)
    return {"model": bb.name, "images": n, **t,
            **{k.replace("_s", "_img_per_s"): n / v for k, v in t.items()},
            "draft_vs_model_only": t["model_only_s"] / t["cliplab_draft_s"],
            "exact_vs_model_only": t["model_only_s"] / t["cliplab_exact_s"],
            "draft_vs_plain": t["plain_open_clip_s"] / t["cliplab_draft_s"],
            "exact_vs_plain": t["plain_open_clip_s"] / t["cliplab_exact_s"],
            "draft_cosine_mean": float(cos.mean()), "draft_cosine_min": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of JPEG files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="40 files, 1 repeat (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 40, 1
    os.environ.setdefault("CLIPLAB_PROGRESS", "0")
    big, small = vit_b32(), tiny64()
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "repeats": args.repeats, "text": bench_text(big, args.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        result["images_vit_b32"] = bench_images(big, paths, args.repeats)
        result["images_tiny64"] = bench_images(small, paths, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "encode.json").write_text(json.dumps(result, indent=2))
    t, b, s = result["text"], result["images_vit_b32"], result["images_tiny64"]
    print(f"text fast path {t['speedup']:.1f}x open_clip (max diff {t['max_abs_diff']:.1e}); "
          f"ViT-B-32 images: cliplab draft {100 * b['draft_vs_model_only']:.0f}% of model-only, "
          f"{b['draft_vs_plain']:.2f}x plain loop; tiny 64px: {s['draft_vs_plain']:.1f}x plain loop "
          f"(exact {s['exact_vs_plain']:.1f}x); draft cosine {b['draft_cosine_mean']:.4f}")


if __name__ == "__main__":
    main()
