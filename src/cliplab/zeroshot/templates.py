"""Prompt template sets, stored as data in ``templates.json``.

A template is a string with a ``{c}`` (or ``{}``) placeholder for the class name.
Named sets: ``default`` (one template, "a photo of a {c}."), ``openai-7`` (the
7-template ensemble OpenAI selected for ImageNet) and ``openai-80`` (the full 80
ImageNet templates of the CLIP paper).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..data.text import read_lines
from ..errors import DataError, UsageError

_DATA = Path(__file__).with_name("templates.json")


@lru_cache(maxsize=1)
def _sets() -> dict[str, list[str]]:
    return json.loads(_DATA.read_text())


def list_template_sets() -> list[str]:
    """Names of the bundled template sets."""
    return sorted(_sets())


def _normalise(template: str) -> str:
    if "{c}" in template:
        return template
    if "{}" in template:
        return template.replace("{}", "{c}")
    raise UsageError(f"template {template!r} has no '{{c}}' or '{{}}' placeholder for the class name")


def get_templates(spec: str | list[str] | tuple[str, ...] | None = "default") -> list[str]:
    """Resolve a template spec to a list of ``{c}`` templates.

    Parameters
    ----------
    spec : str, list of str or None
        A bundled set name (see :func:`list_template_sets`), a path to a text file
        with one template per line (``#`` comments and blank lines ignored), a
        single template string containing a placeholder, or a list of templates.
    """
    if spec is None:
        spec = "default"
    if isinstance(spec, (list, tuple)):
        templates = [_normalise(t) for t in spec]
    elif spec in _sets():
        templates = list(_sets()[spec])
    elif Path(spec).exists() or ("{" not in spec and (Path(spec).suffix or os.sep in spec or "/" in spec)):
        templates = [_normalise(s) for s in read_lines(spec, what="template file")]  # DataError if unreadable
        if not templates:
            raise DataError(f"{spec}: the template file has no templates; write one per line, "
                            "with {c} for the class name")
    elif "{" in spec:
        templates = [_normalise(spec)]
    else:
        raise UsageError(f"unknown template set {spec!r}: use one of {', '.join(list_template_sets())}, "
                         "a file with one template per line, or a string with '{c}'")
    if not templates:
        raise UsageError(f"template spec {spec!r} gives no templates")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname)
