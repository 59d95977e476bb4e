"""benchmarks/vladva_shapes.py --quick: one row per λ and seed, the summary, and no NTP term at λ = 0."""

import json

from _benchmarks import load_benchmark, run_benchmark


def test_quick_run_writes_rows_and_summary(tmp_path):
    out = tmp_path / "vladva.json"
    run_benchmark(load_benchmark("vladva_shapes.py"), ["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    runs = [r["run"] for r in result["rows"]]
    assert runs == ["shapes-tiny (not adapted)", "joint (λ=1)", "contrastive only (λ=0)"]
    joint, contrastive = result["rows"][1], result["rows"][2]
    assert "loss_ntp" in joint["final_loss"] and "loss_ntp" not in contrastive["final_loss"]
    assert [c["step"] for c in joint["curve"]] == [3]
    for name in runs[1:]:
        assert 0 <= result["summary"][name]["t2i_r1"]["mean"] <= 1 and result["summary"][name]["n_seeds"] == 1
    # the vocabulary record and the base row, recomputed here
    assert 0 < result["vocabulary"]["size"] < 49408 and result["vocabulary"]["checked_scenes"] == 64
    import cliplab
    from cliplab.data.shapes import shapes_task

    base, cnt = cliplab.load("shapes-tiny"), shapes_task("count", "test", 24, seed=0)
    img = base.encode_images(list(cnt.items), progress=False).features
    txt = base.encode_texts([f"a photo of {c}." for c in cnt.classnames], progress=False)
    assert result["rows"][0]["count_acc"] == float(((img @ txt.T).argmax(1) == cnt.labels).mean())
