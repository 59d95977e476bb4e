"""Nano-Capsulator: capsules are real text within the token budget by the Backbone's tokenizer, keep
the long caption's meaning better than truncation, and follow the greedy search's definition."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.generative.capsulator import Capsulator, compact, text_units

from _generative_data import LONG


def test_units_and_compact_forms():
    units = text_units(LONG)
    assert len(units) == 8 and units[0] == "A picture of three shapes on a striped background."
    first = "The first shape is a large red circle at the top left."
    assert compact(first) == "first shape large red circle at top left"
    assert compact("There are no defects.") == "no defects"


def test_capsule_fits_the_budget_and_keeps_more_than_truncation(shapes_tiny):
    cap = Capsulator(shapes_tiny)
    tok = shapes_tiny.tokenizer
    assert len(tok.encode(LONG)) + 2 > shapes_tiny.context_length              # the text tower would cut it
    (capsule,), scores = cap.compress([LONG], return_scores=True)
    assert len(tok.encode(capsule)) + 2 <= shapes_tiny.context_length == cap.budget
    assert set(capsule.replace(".", "").lower().split()) <= set(LONG.replace(".", "").replace(":", "").lower().split())
    goal = cap.targets([LONG])[0]
    kept = float(shapes_tiny.encode_texts([capsule])[0] @ goal)
    assert kept == pytest.approx(float(scores[0]), abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                      # the truncation warning
        truncated = float(shapes_tiny.encode_texts([LONG])[0] @ goal)         # the current behaviour
    assert kept > truncated + 0.02


def test_greedy_step_is_the_best_feasible_unit(shapes_tiny):
    """With a budget that admits one unit, the capsule is the single unit form closest to the target."""
    cap = Capsulator(shapes_tiny, budget=14)
    goal = cap.targets([LONG])[0]
    forms = {f for u in text_units(LONG) for f in (u, compact(u)) if cap.n_tokens(f) <= 14}
    best = max(forms, key=lambda f: float(shapes_tiny.encode_texts([f])[0] @ goal))
    (capsule,) = cap.compress([LONG])
    assert cap.n_tokens(capsule) <= 14
    assert best in capsule                                                 # the first greedy step


def test_fit_removes_the_common_direction(shapes_tiny):
    corpus = [LONG, "A picture of one shape on a plain background. The shape is a small green star. "
                    "There are no defects."]
    cap = Capsulator(shapes_tiny).fit(corpus)
    units = [u for t in corpus for u in text_units(t)]
    np.testing.assert_allclose(cap.common_, shapes_tiny.encode_texts(units).mean(0), atol=1e-6)
    mean = shapes_tiny.encode_texts(text_units(LONG)).mean(0) - cap.common_
    np.testing.assert_allclose(cap.targets([LONG])[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_short_text_is_its_own_capsule_and_errors(shapes_tiny):
    cap = Capsulator(shapes_tiny)
    assert cap.compress(["a red circle"]) == ["a red circle"]
    with pytest.raises(UsageError, match="budget"):
        Capsulator(shapes_tiny, budget=100)
    with pytest.raises(UsageError, match="target"):
        Capsulator(shapes_tiny, target="words")
    with pytest.raises(UsageError, match="strings"):
        cap.compress([1])


def test_captions_compress_command_rewrites_only_long_captions(tmp_path, capsys):
    """`cliplab captions compress`: long captions become capsules within the context, short ones stay."""
    import json

    import cliplab
    from cliplab.cli.main import main
    from cliplab.surgery.longclip import longclip_world

    bb = cliplab.load("shapes-tiny")
    _, scenes = longclip_world(n_objects=(2, 3)).render_batch("test", range(3))
    longs = [s.long_caption for s in scenes]                    # 64-112 tokens; shapes-tiny reads 32
    short = scenes[0].captions[0]
    rows = [{"filepath": f"{i}.png", "caption": t} for i, t in enumerate(longs + [short])]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "caps.jsonl"
    assert main(["captions", "compress", str(table), "--out", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    n_tokens = [len(bb.tokenizer.encode(r["caption"][0])) + 2 for r in got]
    assert len(got) == 4 and all(n <= bb.context_length for n in n_tokens)
    assert [r["original"][0] for r in got] == [r["caption"] for r in rows]
    assert got[3]["caption"] == [short]                          # already fits: kept as written
    assert all(r["caption"][0] != r["original"][0] for r in got[:3])
    assert "3 longer than" in capsys.readouterr().out
    assert main(["captions", "compress", str(table), "--out", str(tmp_path / "x.csv")]) == 2
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert main(["captions", "compress", str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 4


def test_a_text_without_any_unit_within_the_budget_is_cut_not_emptied(shapes_tiny, tmp_path, capsys):
    import json

    from cliplab.cli.main import main

    url = "https://example.com/" + "-".join(f"segment{i}" for i in range(40))   # one unit, ~100 tokens
    cap = Capsulator(shapes_tiny, budget=12)
    (capsule,), scores = cap.compress([url], return_scores=True)
    assert capsule and cap.n_tokens(capsule) <= 12 and np.isfinite(scores[0])
    assert url.startswith(capsule) and cap.n_tokens(url[:len(capsule) + 1]) > 12 and cap.n_cut_ == 1
    cap.compress(["a red circle. a blue star."])
    assert cap.n_cut_ == 0                                       # counted per call
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"filepath": "0.png", "caption": url}) + "\n")
    out = tmp_path / "caps.jsonl"
    assert main(["captions", "compress", str(table), "--out", str(out), "--budget", "12"]) == 0
    row = json.loads(out.read_text())
    assert row["caption"][0] and row["original"] == [url]
    assert "1 caption(s) had no sentence or phrase within 12 tokens" in capsys.readouterr().err


def test_captions_compress_checks_the_output_first_and_names_skipped_rows(tmp_path, capsys):
    import json

    from cliplab.cli.main import main

    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"filepath": "a.png", "caption": "a red circle. a blue star."}) + "\n{bad\n")
    (tmp_path / "d.jsonl").mkdir()
    assert main(["captions", "compress", str(table), "--out", str(tmp_path / "d.jsonl")]) == 4
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["captions", "compress", str(table), "--out", str(tmp_path / "f" / "c.jsonl")]) == 4
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["captions", "compress", str(table), "--out", str(tmp_path / "c.jsonl"), "--budget", "5"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {table}:2: malformed row" in err and "leaves room for only a few words" in err
