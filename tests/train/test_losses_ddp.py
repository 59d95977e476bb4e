"""cloob, hard-negatives, hqclip and lightclip under DDP: two ranks train exactly as one process on the global batch.

aclip (its own family: a second, EMA forward and heads of its own) is checked in the same
2-rank launch: every rank ends with the same model, heads and teacher.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

LOSSES = ("cloob", "hard-negatives", "hqclip", "lightclip")
CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _ddp_main(out_dir):
    """Entry point of the parity run (also run as a single process): 3 steps of each objective."""
    import torch.distributed as dist

    from cliplab.data.shapes import ShapesWorld
    from cliplab.train import TrainConfig, Trainer, init_model
    from cliplab.train.datasets import ShapesTrainSet

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    world = ShapesWorld(seed=0, image_size=32, n_objects=(1, 2), split_sizes={"train": 32, "val": 4, "test": 4})
    for loss in LOSSES:
        built = init_model(CFG, loss=loss)
        config = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=0, log_every=1,
                             out_dir=str(Path(out_dir) / loss), loss=loss, device="cpu")
        data = ShapesTrainSet(world, negatives=int(loss == "hqclip"), tags=loss == "hqclip")
        Trainer(built.model, built.tokenizer, built.preprocess, data, config, model_cfg=built.model_cfg,
                progress=False).fit()
    if dist.is_initialized():
        from cliplab.train.losses import get_loss

        built, objective = init_model(CFG, loss="aclip"), get_loss("aclip")
        config = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=0, log_every=1,
                             out_dir=str(Path(out_dir) / "aclip"), device="cpu")
        Trainer(built.model, built.tokenizer, built.preprocess, ShapesTrainSet(world), config,
                model_cfg=built.model_cfg, progress=False, objective=objective).fit()
        torch.save({"model": built.model.state_dict(), "objective": objective.state_dict()},
                   Path(out_dir) / "aclip" / f"rank{dist.get_rank()}.pt")
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ddp_objectives', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod._ddp_main(sys.argv[1])\n")
    env = {**os.environ, "CLIPLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=180)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                    str(script), str(tmp_path / "two")], env=env, check=True, timeout=300)
    for loss in LOSSES:
        rows = [[json.loads(line) for line in (tmp_path / run / loss / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two")]
        for key in ("loss", "loss_contrastive", "logit_scale"):
            np.testing.assert_allclose([r[key] for r in rows[1]], [r[key] for r in rows[0]], atol=1e-5, rtol=0)
        w1, w2 = (load_file(str(tmp_path / run / loss / "checkpoints/step_0000003/open_clip_model.safetensors"))
                  for run in ("one", "two"))
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=f"{loss}: {k}")
        h1, h2 = (torch.load(tmp_path / run / loss / "checkpoints/step_0000003/trainer_state.pt",
                             weights_only=True).get("objective", {}) for run in ("one", "two"))
        assert h1.keys() == h2.keys() and (loss != "lightclip" or h1)    # lightclip's own head, averaged too
        for k in h1:
            torch.testing.assert_close(h2[k], h1[k], atol=1e-5, rtol=0, msg=f"{loss}: objective {k}")
    # aclip: each rank draws its own crops and its heads' BatchNorm sees half the batch (the
    # reference's plain BatchNorm does too), so no one-process parity; but the heads' gradients
    # are averaged like the model's, and every rank holds the same model, heads and teacher.
    r0, r1 = (torch.load(tmp_path / "two" / "aclip" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["model"]["visual.proj"], r0["objective"]["teacher.proj"])  # it trained; EMA lags
    for part in ("model", "objective"):
        for k, v in r0[part].items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # per-rank BN statistics
                torch.testing.assert_close(r1[part][k], v, atol=1e-6, rtol=0, msg=f"aclip {part}: {k}")
