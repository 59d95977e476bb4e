"""``cliplab longclip``: stretch and fine-tune a model on ShapesWorld long captions."""

from cliplab.cli.main import main


def test_longclip_writes_a_model_with_the_longer_context(tiny_dir, tmp_path, capsys):
    import cliplab

    out = tmp_path / "run"
    assert main(["longclip", "--out", str(out), "--steps", "1", "--batch-size", "4", "--model", str(tiny_dir)]) == 0
    assert "context 24 -> 36 tokens" in capsys.readouterr().out
    assert cliplab.load(out / "model").context_length == 36


def test_bad_options_are_one_line(tiny_dir, tmp_path, capsys):
    for bad, message in ((["--pca-dim", "-1"], "--pca-dim"), (["--keep", "30"], "keep"),
                         (["--context", "20"], "must exceed")):
        rc = main(["longclip", "--out", str(tmp_path / "x"), "--steps", "1", *bad, "--model", str(tiny_dir)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
