"""``cliplab bundle``: a checkpoint written as an fp16 open_clip folder that loads back."""

from __future__ import annotations

import numpy as np
from safetensors import safe_open

import cliplab
from cliplab.cli.main import main


def test_bundle_writes_fp16_weights_that_load_as_the_model(tiny_dir, tiny, tmp_path, capsys):
    out = tmp_path / "bundled"
    assert main(["bundle", str(tiny_dir), str(out)]) == 0
    assert "MiB of fp16 weights" in capsys.readouterr().out
    with safe_open(str(out / "open_clip_model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert dtypes == {"torch.float16"}
    again = cliplab.load(out)
    texts = ["a red star", "a blue circle"]
    np.testing.assert_allclose(again.encode_texts(texts), tiny.encode_texts(texts), atol=2e-2)


def test_bundle_errors_are_one_line(tmp_path, capsys):
    assert main(["bundle", str(tmp_path / "missing"), str(tmp_path / "out")]) == 4
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "open_clip_config.json").write_text("{}")
    assert main(["bundle", str(tmp_path / "bad"), str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("cliplab: error:") for line in err)
    assert "missing" in err[0] and "no model_cfg" in err[1]
