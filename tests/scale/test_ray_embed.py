"""``cliplab embed --engine ray``: the features of the single-process path, and a run killed
with SIGKILL then started again ends with exactly the features of an uninterrupted run.

One local Ray instance (2 CPUs) serves the module; the killed run is a subprocess that joins
it by address (``--address``, as on a cluster).  The kill comes at a known point: in the
killed run the last image of the folder is a named pipe, so the run writes the other shards
and then waits on it.  Ray runs are few (each starts model actors, seconds): the
uninterrupted run is shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Data is an optional dependency: pip install 'cliplab[scale]'")

from cliplab.cli.main import main  # noqa: E402
from cliplab.errors import UsageError  # noqa: E402
from cliplab.scale import embed_ray, list_sources, read_embeddings  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
OPTS = dict(batch_size=2, shard_size=4, progress=False)


def _make_inputs(root: Path) -> list[Path]:
    """An image folder (9 images, one broken file, ``zz_last.png`` sorted last), a WebDataset
    shard of two of its images and a parquet table of two paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = root / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 255, (30 + 5 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 3 == 0 else "") / f"im{i}.{'jpg' if i % 2 else 'png'}")
    (folder / "broken.png").write_bytes(b"not an image")
    shutil.copy(folder / "im2.png", folder / "zz_last.png")
    shard = root / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for key, name in (("a", "im1.jpg"), ("b", "im2.png")):
            tar.add(folder / name, arcname=f"{key}.{name.split('.')[1]}")
            (root / f"{key}.txt").write_text("a caption")
            tar.add(root / f"{key}.txt", arcname=f"{key}.txt")
    (root / "table").mkdir()
    pq.write_table(pa.table({"path": ["../imgs/im4.png", str(folder / "sub" / "im3.jpg")]}),
                   root / "table" / "paths.parquet")
    return [folder, shard, root / "table" / "paths.parquet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """The inputs, and their uninterrupted ray run (in a module-wide local Ray instance)."""
    root = tmp_path_factory.mktemp("ray-embed")
    inputs = _make_inputs(root / "in")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False, logging_level="warning")
    try:
        res = embed_ray(inputs, root / "whole", model=str(tiny_dir), **OPTS)
        yield inputs, root / "whole", res
    finally:
        ray.shutdown()


def test_features_equal_the_single_process_path(run, tiny_dir, tmp_path):
    inputs, whole, res = run
    assert main(["embed", str(inputs[0]), "--out", str(tmp_path / "ref.npy"), "--no-cache",
                 "--batch-size", "2", "--model", str(tiny_dir)]) == 0
    ref = np.load(tmp_path / "ref.npy")
    items = json.loads((tmp_path / "ref.npy.json").read_text())["items"]
    paths, index, feats = read_embeddings(whole)
    folder = inputs[0]
    assert len(items) == 9 and paths[:9] == items
    np.testing.assert_array_equal(feats[:9], ref)                 # bit for bit
    assert paths[9:] == [f"{inputs[1]}:a", f"{inputs[1]}:b", str(folder / "im4.png"), str(folder / "sub" / "im3.jpg")]
    # the shard's and the table's images are the folder's files: same features (other batches)
    same = [items.index(str(folder / n)) for n in ("im1.jpg", "im2.png", "im4.png", "sub/im3.jpg")]
    np.testing.assert_allclose(feats[9:], ref[same], atol=1e-6)
    assert (res.n_items, res.n_shards, res.n_resumed, res.n_features) == (14, 4, 0, 13)
    assert [(s.index, Path(s.source).name) for s in res.skipped] == [(0, "broken.png")]
    assert index.tolist() == list(range(1, 14))
    # started again on a finished run: nothing recomputed, nothing changed
    again = embed_ray(inputs, whole, model=str(tiny_dir), **OPTS)
    assert (again.n_resumed, again.n_features, again.skipped) == (4, 13, res.skipped)
    np.testing.assert_array_equal(read_embeddings(whole)[2], feats)


def test_a_killed_run_resumes_to_the_uninterrupted_features(run, tiny_dir, tmp_path):
    inputs, whole, res = run
    folder = tmp_path / "imgs"
    shutil.copytree(inputs[0], folder)
    last = folder / "zz_last.png"
    last.unlink()
    os.mkfifo(last)                     # its batch waits here until the run is killed
    args = [folder, *inputs[1:]]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "CLIPLAB_PROGRESS": "0"}
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cliplab.cli.main", "embed", *map(str, args), "--out", str(out),
           "--engine", "ray", "--address", address, "--batch-size", "2", "--shard-size", "4",
           "--model", str(tiny_dir)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("part-*.done")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    done_at_kill = sorted(p.name for p in out.glob("part-*.done"))
    assert 1 <= len(done_at_kill) < 4 and "part-00002.done" not in done_at_kill  # the pipe's shard
    try:  # a decoding task of the dead run may still wait on the pipe: end it (EOF)
        os.close(os.open(last, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass                            # nobody reading
    last.unlink()
    shutil.copy(inputs[0] / "zz_last.png", last)
    again = embed_ray(args, out, model=str(tiny_dir), **OPTS)
    assert again.n_resumed == len(done_at_kill)
    paths, index, feats = read_embeddings(out)
    ref_paths, ref_index, ref_feats = read_embeddings(whole)
    assert [p.replace(str(folder), str(inputs[0])) for p in paths] == ref_paths   # same order
    assert len(set(paths)) == len(paths) == 13                                      # no duplicates
    assert index.tolist() == ref_index.tolist()
    np.testing.assert_array_equal(feats, ref_feats)
    assert [(s.index, s.reason) for s in again.skipped] == [(s.index, s.reason) for s in res.skipped]
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_a_rerun_with_another_model_or_options_is_refused(run, tiny_dir):
    inputs, whole, _ = run
    with pytest.raises(UsageError, match="another batch_size"):
        embed_ray(inputs, whole, model=str(tiny_dir), batch_size=4, shard_size=4, progress=False)
    with pytest.raises(UsageError, match="another fingerprint"):
        embed_ray(inputs, whole, batch_size=2, shard_size=4, progress=False)   # shapes-tiny


def test_list_sources_reads_tables_and_webdataset_shards(tmp_path):
    folder, shard, table = _make_inputs(tmp_path)
    assert [s.label for s in list_sources([table])] == [str(folder / "im4.png"), str(folder / "sub" / "im3.jpg")]
    wds = list_sources([shard])
    assert [s.label for s in wds] == [f"{shard}:a", f"{shard}:b"]
    with open(shard, "rb") as f:
        f.seek(wds[0].offset)
        assert f.read(wds[0].size) == (folder / "im1.jpg").read_bytes()


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["embed", str(tmp_path), "--out", str(tmp_path / "f.npy"), "--engine", "ray"]) == 2
    assert "--out is a folder" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("a\n")
    assert main(["embed", "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert main(["embed", str(tmp_path), "--out", str(tmp_path / "f.npy"), "--address", "auto"]) == 2
