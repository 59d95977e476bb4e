"""Start-up: the command line and ``import cliplab`` import nothing heavy they do not use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cliplab
from cliplab.cli.main import build_parser, commands, main

HEAVY = ("torch", "sklearn", "scipy", "open_clip", "matplotlib", "transformers", "ray")


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    code = ("import contextlib, io\nfrom cliplab.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'classify' in out.getvalue()\n"
            "import cliplab\nassert 'load' in dir(cliplab)")
    assert _imported_after(code) == []


def test_classify_help_imports_no_model_or_estimator_code():
    code = ("import contextlib, io\nfrom cliplab.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['classify', '--help'])\n"
            "    except SystemExit as e:\n        assert e.code == 0")
    assert _imported_after(code) == []


def test_zero_shot_classify_imports_no_estimator_or_plotting_code(tiny_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "one.png")
    code = ("import contextlib, io\nfrom cliplab.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['classify', {str(tmp_path / 'one.png')!r}, '--labels', 'a,b', "
            f"'--model', {str(tiny_dir)!r}]) == 0")
    assert set(_imported_after(code)) == {"torch", "open_clip"} | ({"transformers"} & set(_imported_after(
        "import open_clip")))


def test_commands_are_the_modules_with_add_parser_and_run():
    import importlib
    import pkgutil

    import cliplab.cli

    found = commands()
    modules = [m.name for m in pkgutil.iter_modules(cliplab.cli.__path__) if not m.name.startswith("_")]
    for name in modules:
        module = importlib.import_module(f"cliplab.cli.{name}")
        is_command = callable(getattr(module, "add_parser", None)) and callable(getattr(module, "run", None))
        assert (name in found) == is_command, name
        if is_command:
            assert found[name] == module.HELP and "\n" not in module.HELP
    assert {"classify", "train", "bundle"} <= set(found) and "main" not in found


@pytest.mark.parametrize("name", sorted(commands()))
def test_each_command_builds_its_own_parser(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cliplab {name}")
    parser = build_parser()  # without a command: every command listed, none built
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


def test_lazy_public_api():
    from cliplab.models.backbone import Backbone
    from cliplab.models.loading import load
    from cliplab.zeroshot import ZeroShotClassifier

    assert cliplab.load is load and cliplab.Backbone is Backbone
    assert cliplab.ZeroShotClassifier is ZeroShotClassifier
    assert set(cliplab.__all__) <= set(dir(cliplab))
    namespace = {}
    exec("from cliplab import *", namespace)
    assert namespace["load"] is load and namespace["UnsafeCheckpoint"] is cliplab.UnsafeCheckpoint
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cliplab.nope


def test_lazy_train_package():
    import cliplab.train as train
    from cliplab.train.trainer import Trainer

    assert train.Trainer is Trainer and "shapes-tiny" in train.list_recipes()
    assert set(train.__all__) <= set(dir(train))
