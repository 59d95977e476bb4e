"""Every registered method is reachable from the command line and documented.

The test walks :func:`cliplab.registry.all_registries`, so a new registry and every new
entry are checked without editing this file; a new *kind* of registry declares once, in
``CLI`` below, the command-line option that selects its entries.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cliplab.cli.main import build_parser
from cliplab.registry import Registry, all_registries

ROOT = Path(__file__).resolve().parents[1]

# Registry kind -> the arguments of ``cliplab`` that select an entry ({name}, or {example}: the
# entry's ``example`` metadata, for kinds chosen by the form of a value such as a model spec);
# the command is the first word.  Only options are given, nothing is loaded or run.
CLI = {
    "eval task": "eval --task {name}",
    "dense method": "segment img.png --labels a,b --method {name} --out o",
    "ShapesWorld": "shapes export out --n 1 --world {name}",
    "ShapesWorld task": "eval --task zeroshot_classification --dataset {example}",  # shapes:<task>
    "ShapesWorld domain": "shapes export out --n 1 --domain {name}",
    "few-shot method": "adapt --method {name} --shots 1 --dataset d --out o",
    "model source": "classify img.png --labels a,b --model {example}",   # a spec this source loads
    "loss": "train --loss {name}",
    "recipe": "train --recipe {name}",
    "index type": "index build src --out o --index-type {name}",
    "anomaly method": "anomaly folder --method {name}",
    "proposal method": "detect img.png --labels a,b --proposals {name} --out o",
    "caption head": "caption --train o --head {name}",
}


@pytest.fixture(scope="module")
def registries() -> list[Registry]:
    return all_registries()


def _docs() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_all_registries_finds_the_module_level_registries(registries):
    from cliplab.train.losses import LOSSES
    from cliplab.train.recipes import RECIPES

    assert any(r is LOSSES for r in registries) and any(r is RECIPES for r in registries)
    assert len({id(r) for r in registries}) == len(registries)
    made_here = Registry("made-in-a-test")
    assert all(r is not made_here for r in all_registries())  # only registries of cliplab's modules


def test_every_registry_kind_has_a_command_line_option(registries):
    missing = sorted({r.kind for r in registries} - set(CLI))
    assert not missing, (f"registries with no command-line option: {missing}; declare the option that "
                         f"selects an entry, as 'KIND': 'COMMAND --OPTION {{name}}', in CLI of {__file__}")


def test_every_entry_is_accepted_by_its_command_line_option(registries):
    failures = []
    for registry in registries:
        if registry.kind not in CLI:
            continue  # reported by the test above
        for name in registry.names():
            value = registry.meta(name).get("example", name) if "{example}" in CLI[registry.kind] else name
            argv = [arg.format(name=name, example=value) for arg in shlex.split(CLI[registry.kind])]
            try:
                args = build_parser(argv[0]).parse_args(argv)
            except SystemExit:
                failures.append(f"{registry.kind} {name!r}: `cliplab {shlex.join(argv)}` is rejected")
                continue
            if value not in vars(args).values():
                failures.append(f"{registry.kind} {name!r}: `cliplab {shlex.join(argv)}` does not select it")
    assert not failures, "\n".join(failures)


def test_every_entry_has_a_one_line_help(registries):
    bad = [f"{r.kind} {name!r}" for r in registries for name in r.names()
           if not isinstance(r.meta(name).get("help"), str) or "\n" in r.meta(name)["help"]
           or not r.meta(name)["help"].strip()]
    assert not bad, f"entries without help='one line' at registration: {', '.join(bad)}"


def test_every_entry_is_named_in_the_docs(registries):
    text = _docs()
    missing = [f"{r.kind} {name!r}" for r in registries for name in r.names()
               if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    assert not missing, f"not named in README.md or docs/*.md: {', '.join(missing)}"
