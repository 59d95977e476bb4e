"""Embedding on Ray Data: the throughput model of docs/search.md (section "Scale: embedding on Ray Data") against a measurement.

For two models, one cheap (shapes-tiny, 64 px: decoding dominates) and one costlier (a
random-init ViT with a 224 px input, 12 layers of width 384: the model dominates), on
``--n`` photo-like 640x480 JPEG files:

1. ``t_decode``: seconds per image of what a decoding task does (safe decode, then the PIL
   steps of the eval transform to uint8 pixels), one thread, in this process;
2. ``t_model``: seconds per image of what a model actor does (``encode_images`` on those
   pixels, batches of ``--batch-size``), one torch thread; both measured just before and
   just after the Ray run and averaged (the load of a shared machine drifts);
3. the prediction for a local Ray instance of ``C = --num-cpus`` CPUs with ``A`` CPU model
   actors (one CPU each): decoding tasks get the other ``C - A`` CPUs, so
   ``throughput = min((C - A) / t_decode, A / t_model)`` images per second;
4. the measurement: ``cliplab.scale.embed_ray`` on the same files, shards of
   ``2 * --batch-size`` images; steady-state throughput from the completion times of the
   shard markers (images of shards 2..n over the time from the first marker to the last),
   so Ray's start-up and the actors' model loading are left out, as in the model;
5. the same prediction with the CPU each stage actually got during that window (read from
   /proc for the Ray worker processes: ``decode_cores``, ``model_cores``) and the CPU cost per
   image (``process_time``) instead of wall-clock costs: on a machine shared with other jobs
   the wall-clock prediction assumes whole cores the run does not get; this one does not.

Usage: python benchmarks/embed_ray.py [--n 320] [--batch-size 16] [--num-cpus 2]
Writes benchmarks/results/embed_ray.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import cliplab
from cliplab.models.convert import save_open_clip_folder
from cliplab.models.loading import build_model
from cliplab.scale import embed_ray, read_embeddings
from cliplab.scale.ray_embed import Source, decode_pixels

RESULTS = Path(__file__).parent / "results"
VIT224 = {"embed_dim": 256,
          "vision_cfg": {"image_size": 224, "layers": 12, "width": 384, "patch_size": 32, "head_width": 64},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}}


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like 640x480 JPEGs: smoothed noise (JPEG decoding cost of a real photo's size)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
        img = small.resize((640, 480), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        paths.append(folder / f"img{i:05d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def time_decode(paths, preprocess_cfg) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a decoding task's work."""
    for p in paths[:4]:
        decode_pixels(Source(str(p), str(p)), preprocess_cfg)
    t, c = time.perf_counter(), time.process_time()
    for p in paths:
        decode_pixels(Source(str(p), str(p)), preprocess_cfg)
    return (time.perf_counter() - t) / len(paths), (time.process_time() - c) / len(paths)


def time_model(backbone, paths, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a model actor's work (one torch thread)."""
    pixels = np.stack([decode_pixels(Source(str(p), str(p)), backbone.preprocess_cfg) for p in paths])
    backbone.encode_images(pixels[:batch_size], batch_size=batch_size, progress=False, workers=0)
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, len(pixels), batch_size):
        backbone.encode_images(pixels[s:s + batch_size], batch_size=batch_size, progress=False, workers=0)
    return (time.perf_counter() - t) / len(pixels), (time.process_time() - c) / len(pixels)


class CpuSampler(threading.Thread):
    """CPU seconds of the Ray worker processes over time, read from /proc every 0.2 s.

    A process is a decoding worker once its title has been ``ray::Map(_decode_batch)``,
    the model actor once it has been ``ray::MapWorker(Map(_Encoder))``.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.role: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            now, cpu = time.time(), {}
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    title = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if "_decode_batch" in title:
                    self.role[int(d)] = "decode"
                elif "_Encoder" in title:
                    self.role[int(d)] = "model"
                if title.startswith("ray::"):
                    cpu[int(d)] = (int(fields[11]) + int(fields[12])) / self.TICK   # utime + stime
            self.samples.append((now, cpu))
            self.stop.wait(0.2)

    def cpu_between(self, t0: float, t1: float, role: str) -> float:
        """CPU seconds the processes of ``role`` used from ``t0`` to ``t1`` (nearest samples)."""
        a = min(self.samples, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.samples, key=lambda s: abs(s[0] - t1))[1]
        return sum(b[p] - a.get(p, b[p]) for p in b if self.role.get(p) == role)


def measure_ray(folder: Path, out: Path, model: str, batch_size: int, num_cpus: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sampler = CpuSampler()
    sampler.start()
    t = time.perf_counter()
    res = embed_ray([folder], out, model=model, batch_size=batch_size, shard_size=2 * batch_size,
                    num_cpus=num_cpus, actors=1, progress=False)
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    marks = sorted((out / f"part-{s:05d}.done").stat().st_mtime for s in range(res.n_shards))
    steady = res.n_items - 2 * batch_size   # images of shards 2..n (the last shard may be partial)
    window = marks[-1] - marks[0]
    _, _, feats = read_embeddings(out)
    cpu = {role: sampler.cpu_between(marks[0], marks[-1], role) for role in ("decode", "model")}
    return {"wall_s": round(wall, 2), "n_shards": res.n_shards, "features": list(feats.shape),
            "steady_img_per_s": round(steady / window, 2),
            # CPU the stages got in the steady window: cores' worth (share) and CPU ms per image
            "decode_cores": round(cpu["decode"] / window, 3), "model_cores": round(cpu["model"] / window, 3),
            "decode_cpu_ms_per_img": round(1000 * cpu["decode"] / steady, 3),
            "model_cpu_ms_per_img": round(1000 * cpu["model"] / steady, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("CLIPLAB_PROGRESS", "0")
    actors = 1
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_jpegs(tmp / "jpegs", args.n)
        save_open_clip_folder(tmp / "vit224", VIT224, build_model(VIT224).state_dict())
        rows = {}
        for name, spec in (("shapes-tiny (64 px)", "shapes-tiny"), ("ViT 224 px, 12x384", str(tmp / "vit224"))):
            bb = cliplab.load(spec)
            # stage costs just before and just after the Ray run, averaged: on a shared machine
            # the load drifts, and the prediction should see the load the run saw
            before = time_decode(paths[:100], bb.preprocess_cfg), time_model(bb, paths[:64], args.batch_size)
            measured = measure_ray(tmp / "jpegs", tmp / "out", spec, args.batch_size, args.num_cpus)
            after = time_decode(paths[:100], bb.preprocess_cfg), time_model(bb, paths[:64], args.batch_size)
            (t_dec, c_dec), (t_mod, c_mod) = [[(b + a) / 2 for b, a in zip(before[k], after[k])] for k in (0, 1)]
            decode_rate, model_rate = (args.num_cpus - actors) / t_dec, actors / t_mod
            predicted = min(decode_rate, model_rate)
            # the same model with the CPU each stage actually got in the run (cores' worth) and
            # CPU costs per image: free of the machine's load, which wall-clock costs are not
            shared = min(measured["decode_cores"] / c_dec, measured["model_cores"] / c_mod)
            rows[name] = {"t_decode_ms": round(1000 * t_dec, 3), "t_model_ms": round(1000 * t_mod, 3),
                          "t_decode_ms_before_after": [round(1000 * before[0][0], 3), round(1000 * after[0][0], 3)],
                          "t_model_ms_before_after": [round(1000 * before[1][0], 3), round(1000 * after[1][0], 3)],
                          "cpu_decode_ms": round(1000 * c_dec, 3), "cpu_model_ms": round(1000 * c_mod, 3),
                          "decode_img_per_s": round(decode_rate, 2), "model_img_per_s": round(model_rate, 2),
                          "bound": "decode" if decode_rate < model_rate else "model",
                          "predicted_img_per_s": round(predicted, 2), **measured,
                          "measured_over_predicted": round(measured["steady_img_per_s"] / predicted, 3),
                          "predicted_with_cpu_shares_img_per_s": round(shared, 2),
                          "measured_over_predicted_with_cpu_shares": round(measured["steady_img_per_s"] / shared, 3)}
            print(f"{name}: decode {1000 * t_dec:.2f} ms/img, model {1000 * t_mod:.2f} ms/img -> "
                  f"predicted {predicted:.1f} img/s ({rows[name]['bound']}-bound), measured "
                  f"{measured['steady_img_per_s']:.1f} img/s (x{rows[name]['measured_over_predicted']:.2f}); "
                  f"with the CPU shares the stages got: predicted {shared:.1f} img/s "
                  f"(x{rows[name]['measured_over_predicted_with_cpu_shares']:.2f}); wall {measured['wall_s']:.0f} s")
    result = {"benchmark": "embed_ray", "n_images": args.n, "image": "640x480 JPEG q90",
              "batch_size": args.batch_size, "num_cpus": args.num_cpus, "actors": actors,
              "cpu_count": os.cpu_count(), "load_avg_1m_at_start": load_start,
              "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
              "platform": platform.platform(), "torch": torch.__version__,
              "ray": __import__("ray").__version__, "models": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed_ray.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
