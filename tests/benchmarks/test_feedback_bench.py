"""benchmarks/feedback_shapes.py: the quick run writes every number the docs table reads."""

import json

from _benchmarks import load_benchmark, run_benchmark


def test_quick_run_and_table(tmp_path):
    bench = load_benchmark("feedback_shapes.py")
    run_benchmark(bench, ["--quick", "--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "work"),
                          "--timesteps", "500", "1000"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert list(res["models"]) == ["shapes-tiny", "diva", "un2clip"]
    for r in res["models"].values():
        assert 0 <= r["pair_accuracy"] <= 1 and 0 <= r["zeroshot_color_shape"] <= 1
        assert 0 <= r["pair_accuracy[val]"] <= 1
        assert len(r["solved"]) == bench.QUICK["n_pairs"]
        assert abs(r["pair_accuracy"] - sum(r["solved"]) / len(r["solved"])) < 1e-9   # the verdicts add up
    for name in ("diva", "un2clip"):
        err = res[f"heldout_denoising_error[{name}]"]
        assert err["before"] > 0 and err["after"] > 0
        bands = res[f"val_condition_reliance[{name}]"]
        assert list(bands) == ["0-250", "250-500", "500-750", "750-1000"]
        assert all(b["own"] > 0 and abs(b["rise"] - (b["shuffled"] / b["own"] - 1)) < 1e-12 for b in bands.values())
    assert res["params"]["fb_timesteps"] == [500, 1000] and res["params"]["gen_timesteps"] is None
    assert (tmp_path / "work" / "gen-global" / "unet.pt").exists()
    table = bench.table_markdown(res).splitlines()
    assert len(table) == 5 and table[2].startswith("| `shapes-tiny` |") and "| +0.0 |" in table[2]
