"""Broken, truncated and wrong-kind model files: one line on stderr and the documented exit code.

Every case runs ``cliplab classify IMG --model FILE`` as a user would.
"""

import argparse
import json
import os

import pytest
import torch
from PIL import Image

from _tiny import TINY_CFG, make_model
from cliplab.cli.main import main
from cliplab.models.convert import model_cfg_to_hf_config
from cliplab.models.state_dicts import save_state_dict


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


@pytest.fixture(scope="module")
def weights():
    return make_model().state_dict()


def classify(image, model, capsys, *extra):
    capsys.readouterr()
    rc = main(["classify", str(image), "--labels", "a,b", "--model", str(model), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return path


def _random_bytes(tmp_path, weights):
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8).tolist()))
    return path


def _empty(suffix):
    def make(tmp_path, weights):
        path = tmp_path / f"empty{suffix}"
        path.write_bytes(b"")
        return path
    return make


def _safetensors_cut(keep):
    def make(tmp_path, weights):
        return _cut(save_state_dict(tmp_path / "w.safetensors", weights, model_cfg=TINY_CFG), keep)
    return make


def _pickle_cut(legacy):
    def make(tmp_path, weights):
        path = tmp_path / "w.pt"
        torch.save(weights, path, _use_new_zipfile_serialization=not legacy)
        return _cut(path, lambda n: n // 2)
    return make


def _png_named(name):
    def make(tmp_path, weights):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
        return tmp_path / name
    return make


def _text_named(name, text):
    def make(tmp_path, weights):
        (tmp_path / name).write_text(text)
        return tmp_path / name
    return make


def _beside_config(raw: bytes):
    def make(tmp_path, weights):
        save_state_dict(tmp_path / "w.safetensors", weights)   # no config inside
        (tmp_path / "w.json").write_bytes(raw)
        return tmp_path / "w.safetensors"
    return make


def _bad_metadata(tmp_path, weights):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"open_clip_config": '{"model_'})
    return path


def _open_clip_folder(raw: bytes):
    def make(tmp_path, weights):
        folder = tmp_path / "oc"
        folder.mkdir()
        save_state_dict(folder / "open_clip_model.safetensors", weights)
        (folder / "open_clip_config.json").write_bytes(raw)
        return folder
    return make


def _hf_folder(config: bytes, with_weights: bool):
    def make(tmp_path, weights):
        folder = tmp_path / "hf"
        folder.mkdir()
        (folder / "config.json").write_bytes(config)
        if with_weights:
            save_state_dict(folder / "model.safetensors", {"logit_scale": torch.ones(())})
        return folder
    return make


def _folder_with_two_weights(tmp_path, weights):
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_state_dict(folder / "epoch_1.safetensors", weights)
    save_state_dict(folder / "epoch_2.safetensors", weights)
    return folder


def _code_pickle(tmp_path, weights):
    path = tmp_path / "code.pt"   # training scripts often pickle their argparse Namespace
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1)}, path)
    return path


HF_CONFIG = json.dumps(model_cfg_to_hf_config(TINY_CFG)).encode()

CASES = {
    # file -> (exit code, phrase of the one-line message)
    "random bytes named .pt": (_random_bytes, 3, "not a readable checkpoint"),
    "empty .pt": (_empty(".pt"), 3, "the file is empty"),
    "empty .safetensors": (_empty(".safetensors"), 3, "the file is empty"),
    "safetensors cut in the data": (_safetensors_cut(lambda n: n // 2), 3, "truncated or corrupt"),
    "safetensors cut in the header": (_safetensors_cut(lambda n: 40), 3, "truncated or corrupt"),
    "torch.save zip cut": (_pickle_cut(legacy=False), 3, "not a readable checkpoint"),
    "legacy torch.save pickle cut": (_pickle_cut(legacy=True), 3, "not a readable checkpoint"),
    "PNG named .safetensors": (_png_named("w.safetensors"), 3, "PNG image"),
    "PNG named .pt": (_png_named("w.pt"), 3, "PNG image"),
    "Git LFS pointer": (_text_named("w.bin", "version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"),
                        3, "git lfs pull"),
    "HTML error page": (_text_named("w.pt", "<!DOCTYPE html><html>404</html>"), 3, "HTML"),
    "config beside, not UTF-8": (_beside_config(b'{"model_cfg": "\xff\xfe"}'), 3, "not UTF-8"),
    "config beside, a list": (_beside_config(b"[1, 2]"), 3, "expected a JSON object, found a JSON array"),
    "config beside, cut": (_beside_config(b'{"model_cfg": {"embed_dim": 3'), 3, "cut or invalid JSON"),
    "config beside, not open_clip": (_beside_config(b'{"model_cfg": 3}'), 3, "not an open_clip config"),
    "cut config in the safetensors metadata": (_bad_metadata, 3, "metadata is not valid JSON"),
    "open_clip folder, cut config": (_open_clip_folder(b'{"model_cfg": {'), 3, "cut or invalid JSON"),
    "open_clip folder, bad preprocess_cfg": (
        _open_clip_folder(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": [1]}).encode()),
        3, "preprocess_cfg must be a JSON object"),
    "open_clip folder with two weights files": (_folder_with_two_weights, 3, "several weights files"),
    "transformers folder without weights": (_hf_folder(HF_CONFIG, False), 3, "has config.json but no weights file"),
    "transformers folder, cut config.json": (_hf_folder(HF_CONFIG[:40], True), 3, "cut or invalid JSON"),
    "transformers folder, config.json not UTF-8": (_hf_folder(b"\xff\xfe{}", True), 3, "not UTF-8"),
    "transformers folder, config.json not an object": (_hf_folder(b'"clip"', True), 3, "expected a JSON object"),
    "transformers folder, invalid value": (
        _hf_folder(HF_CONFIG.replace(b'"hidden_size": 64', b'"hidden_size": "wide"'), True),
        3, "not a valid transformers CLIP config"),
    "pickle that needs code": (_code_pickle, 5, "pickle that needs code"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_model_files_exit_with_one_line(case, tmp_path, image, weights, capsys):
    make, code, phrase = CASES[case]
    rc, err = classify(image, make(tmp_path, weights), capsys)
    assert rc == code, err
    assert phrase in err
    assert err.startswith("cliplab: error:") and "\n" not in err and "Traceback" not in err


def test_random_bytes_are_not_called_a_pickle(tmp_path, weights):
    """Garbage is unreadable (exit 3), never "needs code" (exit 5, which suggests --trust-pickle)."""
    from cliplab.errors import ModelLoadError, UnsafeCheckpoint
    from cliplab.models.state_dicts import read_state_dict

    for seed in range(20):
        path = tmp_path / f"r{seed}.pt"
        path.write_bytes(os.urandom(2048) if seed else bytes(2048))
        with pytest.raises(ModelLoadError) as e:
            read_state_dict(path)
        assert not isinstance(e.value, UnsafeCheckpoint)
    with pytest.raises(UnsafeCheckpoint):
        read_state_dict(_code_pickle(tmp_path, weights))


def test_safetensors_named_bin_is_read_by_content(tmp_path, weights):
    from cliplab.models.state_dicts import read_state_dict

    path = save_state_dict(tmp_path / "w.safetensors", weights)
    path.rename(tmp_path / "w.bin")
    got = read_state_dict(tmp_path / "w.bin")
    assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in weights)
