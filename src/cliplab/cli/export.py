"""``cliplab export``: both towers of a model as ONNX files, optionally with int8 weights,
that ``cliplab.load`` (and ``--model DIR`` of every command) runs with ONNX Runtime
(:mod:`cliplab.models.export`)."""

from __future__ import annotations

import sys

from ._common import add_model_args, load_backbone

HELP = "export a model's two towers to ONNX (optionally int8), runnable with ONNX Runtime"


def add_parser(sub) -> None:
    p = sub.add_parser("export", help=HELP,
                       description="Export MODEL's image and text towers to DIR (image.onnx, text.onnx and "
                                   "the manifest cliplab_export.json), each with a dynamic batch axis and "
                                   "L2-normalised features, checked against PyTorch with ONNX Runtime. "
                                   "`cliplab classify ... --model DIR` then runs the export. Needs "
                                   "pip install 'cliplab[export]'. Exit codes: 2 usage (also a missing "
                                   "onnx/onnxruntime), 3 the model cannot be loaded or exported, 4 DIR "
                                   "cannot be written.")
    p.add_argument("model", metavar="MODEL", help="model spec: bundled name, ARCH:TAG, hf-hub:org/name, "
                                                  "folder or weights file")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights (ONNX Runtime dynamic quantization): about 4x smaller files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new, empty, or an earlier export)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 14 to 20 (default: 18)")
    add_model_args(p, spec=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models.export import export_onnx
    from ..models.onnx_backbone import require

    require("onnx", "onnxruntime", what="cliplab export")  # before loading the model
    backbone = load_backbone(args, args.model)
    m = export_onnx(backbone, args.out, format=args.format, int8=args.int8, opset=args.opset)
    sizes = ", ".join(f"{t}.onnx {m['files'][t]['bytes'] / 2**20:.1f} MiB" for t in ("image", "text"))
    if m["precision"] == "int8":
        q = m["quantization"]["size_ratio"]
        cos = m["check"]["min_cosine_to_pytorch"]
        check = (f"int8 {q['total']:.2f}x smaller than fp32; min cosine to PyTorch: "
                 f"image {cos['image']:.4f}, text {cos['text']:.4f}")
    else:
        d = m["check"]["max_abs_diff"]
        check = f"max abs diff to PyTorch: image {d['image']:.1e}, text {d['text']:.1e}"
    print(f"wrote {args.out} ({m['precision']}: {sizes}); {check}", file=sys.stderr)
    return 0
