"""ONNX export: image-tower speed of PyTorch eager vs ONNX Runtime fp32 vs int8 on the CPU,
file sizes, fp32 parity and int8 agreement.

Models: the bundled shapes-tiny (64 px) and ViT-B-32 with random weights
(``open_clip.create_model("ViT-B-32")``, no download).  Each is exported with
:func:`cliplab.models.export.export_onnx` and quantized with
:func:`~cliplab.models.export.quantize_export` (ONNX Runtime dynamic quantization, int8
weights per tensor).

Speed: the image tower alone on random preprocessed batches of 1 and 16, three contenders
run interleaved (``_interleave.py``: each round runs each once, in a rotated order; ratios
are per round, reported as median and range):

  ``eager``   ``F.normalize(model.encode_image(x))`` under ``torch.inference_mode``;
  ``ort``     ONNX Runtime, the fp32 export (``InferenceSession.run``, CPU provider);
  ``int8``    ONNX Runtime, the int8 export.

torch and ONNX Runtime get the same number of threads (``--threads``, default 1:
``torch.set_num_threads`` and ``intra_op_num_threads``, one inter-op thread).  One
thread, because on a shared 2-core machine under load torch's OpenMP threads wait for
each other: with 2 threads the shapes-tiny image tower took 1,070-1,160 ms a call against
16-30 ms with 1 (load average 18), which would credit ONNX Runtime with torch's
scheduling trouble.  Each contender records the process CPU time of its calls (with one
thread: the work it does, whatever the machine's load) and its wall time; both are
reported, the CPU-time ratios are the ones to trust on a busy machine.

Accuracy: largest feature difference of the fp32 export to PyTorch (both towers, batch 3,
the export's own check); int8 vs PyTorch fp32 zero-shot top-1 agreement on ``--n``
ShapesWorld colour x shape test scenes (64 classes, prompt ensemble ``default``), through
``cliplab``'s ``OnnxBackbone``, and the cosine of the int8 image features to fp32's.  For
the random ViT-B-32 the agreement is of a model that knows nothing (near-tied classes), a
harsher test than a trained model.

Usage: python benchmarks/export_onnx.py [--threads 1] [--rounds 5] [--n 200] [--quick]
Writes benchmarks/results/export_onnx.json and prints a summary.
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
import torch
import torch.nn.functional as F

import cliplab
from cliplab.models.backbone import Backbone
from cliplab.models.export import export_onnx, quantize_export
from cliplab.models.loading import build_model, make_tokenizer
from cliplab.models.onnx_backbone import OnnxBackbone
from cliplab.models.transforms import default_preprocess_cfg

from _interleave import fmt, interleave, ratio

RESULTS = Path(__file__).parent / "results"


def vit_b32() -> Backbone:
    import open_clip

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-32")
    return Backbone(build_model(cfg), model_cfg=cfg, preprocess_cfg=default_preprocess_cfg(cfg),
                    tokenizer=make_tokenizer(cfg), name="ViT-B-32 (random)")


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def speed(bb: Backbone, fp32: Path, int8: Path, batch: int, calls: int, rounds: int, threads: int) -> dict:
    H, W = bb._input_shape()[1:]
    x = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(batch))   # (B, 3, H, W)
    xn = x.numpy()
    sessions = {"ort": session(fp32 / "image.onnx", threads), "int8": session(int8 / "image.onnx", threads)}

    def eager():
        with torch.inference_mode():
            F.normalize(bb.model.encode_image(x), dim=-1)

    def runner(name):
        return lambda: sessions[name].run(["features"], {"image": xn})

    wall: dict[str, list[float]] = {"eager": [], "ort": [], "int8": []}

    def timed(name, fn):
        """``calls`` calls; returns the process CPU seconds, keeps the wall seconds in ``wall``."""
        def run():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append(time.perf_counter() - t)
            return time.process_time() - c
        return run

    contenders = {"eager": timed("eager", eager), "ort": timed("ort", runner("ort")),
                  "int8": timed("int8", runner("int8"))}
    cpu = interleave(contenders, rounds, warmup=contenders)
    wall = {k: v[1:] for k, v in wall.items()}                      # the warm-up call is not a round
    out = {"batch": batch, "calls_per_round": calls, "rounds": rounds}
    for clock, times in (("cpu", cpu), ("wall", wall)):
        per_call = {k: statistics.median(v) / calls for k, v in times.items()}
        out[clock] = {"median_ms_per_call": {k: 1e3 * v for k, v in per_call.items()},
                      "images_per_s": {k: batch / v for k, v in per_call.items()},
                      "ort_fp32_vs_eager": ratio(times, "ort", "eager"),
                      "int8_vs_eager": ratio(times, "int8", "eager"),
                      "int8_vs_ort_fp32": ratio(times, "int8", "ort")}
    return out


def agreement(bb: Backbone, int8: Path, n: int, threads: int) -> dict:
    from cliplab.data.shapes.tasks import shapes_task

    data = shapes_task("color-shape", n=n)
    q = OnnxBackbone(int8, threads=threads)
    want_clf = cliplab.ZeroShotClassifier(bb, data.classnames, progress=False)
    got_clf = cliplab.ZeroShotClassifier(q, data.classnames, progress=False)
    f32 = bb.encode_images(data.items, progress=False).features                     # (N, D)
    f8 = q.encode_images(data.items, progress=False).features                       # (N, D)
    want, got = want_clf.predict(f32), got_clf.predict(f8)
    truth = np.array(data.classnames)[data.labels]
    cos = (f32 * f8).sum(1)
    return {"n": n, "task": "shapes:color-shape (64 classes)", "top1_agreement": float(np.mean(want == got)),
            "accuracy_fp32": float(np.mean(want == truth)), "accuracy_int8": float(np.mean(got == truth)),
            "image_cosine_int8_vs_fp32": {"mean": float(cos.mean()), "min": float(cos.min())}}


def bench_model(bb: Backbone, root: Path, args, calls: dict[int, int]) -> dict:
    fp32, int8 = root / "fp32", root / "int8"
    m32 = export_onnx(bb, fp32, progress=False)
    m8 = quantize_export(fp32, int8, reference=bb)
    q = m8["quantization"]
    out = {"model": bb.name,
           "bytes": {"fp32": q["fp32_bytes"], "int8": q["int8_bytes"]},
           "size_ratio": q["size_ratio"],
           "fp32_max_abs_diff_to_pytorch": m32["check"]["max_abs_diff"],
           "int8_min_cosine_to_pytorch": m8["check"]["min_cosine_to_pytorch"],
           "speed": [speed(bb, fp32, int8, b, c, args.rounds, args.threads) for b, c in calls.items()],
           "int8_agreement": agreement(bb, int8, args.n, args.threads)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of torch and of ONNX Runtime alike (default 1: see the module notes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="ShapesWorld scenes for the int8 agreement")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 48 scenes, fewer calls")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.n = 3, 48
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CLIPLAB_PROGRESS", "0")
    import onnx
    import onnxruntime

    result = {"machine": {"cpus": os.cpu_count(), "threads_torch_and_ort": args.threads,
                          "torch": torch.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                          "load_avg_before": os.getloadavg()},
              "command": (f"python benchmarks/export_onnx.py --threads {args.threads} --rounds {args.rounds} "
                  f"--n {args.n}" + (" --quick" if args.quick else "")),
              "models": []}
    scale = 1 if args.quick else 2
    plan = [(cliplab.load("shapes-tiny"), {1: 50 * scale, 16: 10 * scale}),
            (vit_b32(), {1: 4 * scale, 16: 1})]
    with tempfile.TemporaryDirectory(prefix="export-onnx-bench-") as tmp:
        for i, (bb, calls) in enumerate(plan):
            result["models"].append(bench_model(bb, Path(tmp) / str(i), args, calls))
    result["machine"]["load_avg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_onnx.json").write_text(json.dumps(result, indent=1))
    for m in result["models"]:
        r = m["size_ratio"]
        a = m["int8_agreement"]
        print(f"{m['model']}: int8 {r['total']:.2f}x smaller (image {r['image']:.2f}x, text {r['text']:.2f}x); "
              f"fp32 max abs diff image {m['fp32_max_abs_diff_to_pytorch']['image']:.1e} "
              f"text {m['fp32_max_abs_diff_to_pytorch']['text']:.1e}; int8 top-1 agreement "
              f"{a['top1_agreement']:.3f} on {a['n']} scenes (fp32 acc {a['accuracy_fp32']:.3f}, "
              f"int8 {a['accuracy_int8']:.3f})")
        for s in m["speed"]:
            for clock in ("cpu", "wall"):
                c = s[clock]
                ms = c["median_ms_per_call"]
                print(f"  batch {s['batch']:>2} ({clock:>4}): eager {ms['eager']:.1f} ms, ORT fp32 {ms['ort']:.1f} ms, "
                      f"int8 {ms['int8']:.1f} ms; ORT fp32 vs eager {fmt(c['ort_fp32_vs_eager'])}, "
                      f"int8 vs eager {fmt(c['int8_vs_eager'])}, int8 vs ORT fp32 {fmt(c['int8_vs_ort_fp32'])}")


if __name__ == "__main__":
    main()
