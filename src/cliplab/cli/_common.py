"""Options and output helpers shared by the command modules."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

DEFAULT_MODEL = "shapes-tiny"


def add_model_args(p, *, spec: bool = True) -> None:
    """Model options; ``spec=False`` leaves out ``--model`` (commands taking specs as positionals)."""
    g = p.add_argument_group("model")
    if spec:
        g.add_argument("--model", default=DEFAULT_MODEL,
                       help="model spec: bundled name, ARCH:TAG, hf-hub:org/name, folder or weights file "
                            f"(default: {DEFAULT_MODEL})")
    g.add_argument("--arch", help="open_clip architecture for a bare weights file (e.g. ViT-B-32)")
    g.add_argument("--config", help="open_clip config JSON for a bare weights file")
    g.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="activation of a bare weights file: QuickGELU (--quick-gelu) or GELU "
                        "(--no-quick-gelu); its shapes do not tell")
    g.add_argument("--heads", type=parse_heads, metavar="N|vision=N,text=M",
                   help="attention heads of a bare weights file, both towers or each; its shapes do not tell")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that need code to unpickle (only for files you trust)")


def entries_help(registry) -> str:
    """The entries of a :class:`~cliplab.registry.Registry` with their one-line help, for an
    option's help text: ``"a (what a does); b (what b does)"``."""
    return "; ".join(f"{name} ({registry.meta(name)['help']})" if registry.meta(name).get("help") else name
                     for name in registry.names())


def load_backbone(args, spec: str | None = None):
    """Load ``spec`` (default ``args.model``) with the options of :func:`add_model_args`."""
    from ..models.loading import load

    return load(spec or args.model, device=args.device, precision=args.precision, arch=args.arch,
                config=args.config, quick_gelu=args.quick_gelu, heads=args.heads,
                trust_pickle=args.trust_pickle)


def parse_heads(text: str):
    """``--heads`` value: ``"8"`` (both towers) or ``"vision=12,text=8"``."""
    try:
        if "=" not in text:
            return int(text)
        pairs = dict(part.split("=", 1) for part in text.split(","))
        heads = {k.strip(): int(v) for k, v in pairs.items()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or vision=N,text=M, got {text!r}") from None
    if set(heads) != {"vision", "text"}:
        raise argparse.ArgumentTypeError(f"expected N or vision=N,text=M, got {text!r}")
    return heads


def add_image_args(p) -> None:
    g = p.add_argument_group("images")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 4)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this; 0 = no limit "
                        "(default: CLIPLAB_MAX_PIXELS or about 179 million)")
    g.add_argument("--draft", action="store_true", help="fast reduced-size JPEG decoding")
    g.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")


def image_kwargs(args) -> dict:
    from ..data.images import DEFAULT_MAX_PIXELS

    return dict(batch_size=args.batch_size, workers=args.workers, draft=args.draft,
                max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None))


def report_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for s in skipped[:20]:
            print(f"  {s.source}: {s.reason}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)


def write_rows(rows: list[dict], fmt: str, out=None) -> None:
    """Print rows (dicts with the same keys) as an aligned table, JSON or CSV."""
    out = out or sys.stdout
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    if not rows:
        return
    keys = list(rows[0])
    if fmt == "csv":
        w = csv.DictWriter(out, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        return
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    out.write("  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for c in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table_string(rows: list[dict]) -> str:
    buf = io.StringIO()
    write_rows(rows, "table", buf)
    return buf.getvalue()
