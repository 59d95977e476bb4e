"""``cliplab models``: list bundled models and open_clip pretrained tags."""

from __future__ import annotations

from ._common import write_rows

HELP = "list available models"


def add_parser(sub) -> None:
    p = sub.add_parser("models", help=HELP,
                       description="List bundled models (work offline) and, with --all, every "
                                   "open_clip ARCH:TAG (downloaded on first use).")
    p.add_argument("--all", action="store_true", help="also list every open_clip pretrained ARCH:TAG")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models.loading import bundled_models

    rows = [{"spec": name, "source": "bundled", "offline": "yes"} for name in bundled_models()]
    if args.all:
        import open_clip

        rows += [{"spec": f"{arch}:{tag}", "source": "open_clip", "offline": "after download"}
                 for arch, tag in open_clip.list_pretrained()]
    else:
        rows.append({"spec": "ARCH:TAG, hf-hub:org/name, folder, file", "source": "see --all",
                     "offline": "when cached/local"})
    write_rows(rows, args.format)
    return 0
