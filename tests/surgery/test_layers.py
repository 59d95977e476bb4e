"""The shared surgery layer module: one place for targets and counting, no import cycle."""

import ast
from pathlib import Path

import cliplab.surgery as surgery
from cliplab.surgery import apply_lora, apply_svd, trainable_parameters
from cliplab.surgery.layers import LORA_META_ATTR, TARGETS, TOWERS, find_layers
from cliplab.surgery.svd import SVDWeight

SURGERY = Path(surgery.__file__).parent


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``from X import names`` in ``path``, function level included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [("." * node.level + (node.module or ""), [a.name for a in node.names])
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


def test_lora_and_svd_share_layers_not_each_other():
    for name in ("lora", "svd"):
        other = {"lora": ".svd", "svd": ".lora"}[name]
        imports = _imports(SURGERY / f"{name}.py")
        assert not [m for m, _ in imports if m == other], f"{name}.py imports {other}"
        assert (".layers", ["LORA_META_ATTR", "TARGETS", "TOWERS", "find_layers"]) in imports
    for module, names in _imports(SURGERY / "layers.py"):
        assert module not in (".lora", ".svd")


def test_no_private_names_imported_between_surgery_modules():
    for path in SURGERY.glob("*.py"):
        for module, names in _imports(path):
            if module.startswith(".") and module != ".":
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)


def test_find_layers_covers_every_target_of_both_towers(tiny):
    layers = find_layers(tiny.model)
    n_blocks = tiny.model_cfg["vision_cfg"]["layers"] + tiny.model_cfg["text_cfg"]["layers"]
    assert len(layers) == len(TARGETS) * n_blocks
    assert {k.split(".")[0] == "visual" for k in layers} == {True, False}
    assert TOWERS == ("visual", "text")


def test_trainable_parameters_counts_svd_factors_as_weights(tiny):
    base = sum(p.numel() for p in tiny.model.parameters())
    assert trainable_parameters(tiny) == (base, base)
    sb = apply_svd(tiny)
    params = list(sb.model.parameters())
    factors = sum(m.U.numel() + m.Vh.numel() for m in sb.model.modules() if isinstance(m, SVDWeight))
    assert factors > 0
    assert trainable_parameters(sb) == (sum(p.numel() for p in params if p.requires_grad),
                                        sum(p.numel() for p in params) + factors)
    lb = apply_lora(tiny, rank=2)
    assert getattr(lb.model, LORA_META_ATTR)["rank"] == 2
    n_lora = sum(p.numel() for n, p in lb.model.named_parameters() if "lora_" in n)
    assert trainable_parameters(lb) == (n_lora, base + n_lora)
