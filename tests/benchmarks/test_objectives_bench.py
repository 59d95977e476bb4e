"""benchmarks/objectives.py: rows from the registry, and the table written into the docs."""

import json

import pytest

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("objectives.py")


def _row(name, loss, sps, options=None, budget=None, **cols):
    base = dict(seen=0.5, heldout=0.25, domains=0.3, i2t_r1=0.1, i2t_r5=0.4, t2i_r1=0.12, t2i_r5=0.45, miou=0.2)
    base.update(cols)
    return {"name": name, "loss": loss, "options": options or {}, "samples_per_s": sps, "peak_mb": 1000.0,
            "budget": budget or {"steps": 600, "batch_size": 64, "lr": 0.001, "warmup": 50, "seed": 0,
                                 "pool": 2048}, **base}


def test_rows_come_from_the_loss_registry(bench):
    from cliplab.train.losses import get_loss_class, list_losses

    names = bench.row_names()
    own = [n for n in list_losses() if not get_loss_class(n).needs_teacher]   # teacher shards: their own benchmark
    assert names[:len(own)] == own and "aclip" in own and "mobileclip-dr" not in names
    assert {"noisy", "filtered", "recaptioned", "noisy+rewrites"} <= set(names)


def test_table_writer_on_a_fake_result(bench, tmp_path):
    results = {"rows": {"noisy": _row("noisy", "infonce", 50.0, {"captions": "noisy", "pool": 2048}, seen=0.1),
                        "cloob": _row("cloob", "cloob", 40.0),
                        "infonce": _row("infonce", "infonce", 60.0, miou=0.3333),
                        "recaptioned+rewrites": _row("recaptioned+rewrites", "infonce", 60.0,
                                                     {"captions": "recaptioned", "rewrites": 4, "pool": 2048}),
                        "other": _row("other", "sigmoid", 30.0, budget={"steps": 5})}}
    table = bench.table_markdown(results)
    lines = table.strip().splitlines()
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["`cloob`", "`infonce`", "`other`", "`noisy`",
                                                               "`recaptioned+rewrites`"]
    cloob = lines[2].split("|")
    assert cloob[4].strip() == "50.0" and cloob[-2].strip() == "1.50x"       # 60 / 40 samples/s
    assert lines[3].split("|")[11].strip() == "33.3"                          # mIoU in %
    assert lines[4].split("|")[-2].strip() == "–"                             # another budget: no cost
    assert "recaptioned + 4 rewrites" in lines[6]
    docs = tmp_path / "objectives.md"
    docs.write_text(f"# x\n\nbefore\n{bench.START}\nold\n{bench.END}\nafter\n")
    del results["rows"]["other"]
    bench.write_docs(results, docs)
    text = docs.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{bench.END}\nafter\n")
    assert "600 steps x batch 64" in text and "| `noisy` | infonce | noisy | 10.0 |" in text
    out = tmp_path / "r.json"
    out.write_text(json.dumps(results))
    assert bench.load_results(out)["rows"].keys() == results["rows"].keys()
