"""Resuming `lungdet fit` from an epoch-end checkpoint reproduces the uninterrupted run's weights on CPU.

Three fits of the CLAF config on the synthetic tree (tiny net, 32³ crops, two steps per epoch, constant
learning rate so that a 2-epoch run is the first half of the 4-epoch one): 4 epochs straight; 2 epochs;
2 more epochs from the 2-epoch run's `last.ckpt`. What makes them agree: the crops of epoch *e* come from
(seed, epoch, index) and the sampler order from (seed, epoch) (`lungdet.data.EpochSampler`), the global
generators (dropout) are reseeded from (seed, epoch) at every epoch start, and the checkpoint carries the
weights, BatchNorm statistics, the learned loss weights and the Adam state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from lungdet.cli import run_cli as main

REPO = Path(__file__).resolve().parents[2]
CLAF = str(REPO / "configs" / "claf_luna16.yaml")


def _config(tmp_path: Path, tree: Path, cache: Path) -> str:
    config = {
        "model": {
            "init_args": {"width": 2, "head_channels": 8, "dropout": 0.5, "scheduler": "none", "lr": 0.01}
        },
        "data": {
            "init_args": {
                "root": str(tree),
                "cache_dir": str(cache),
                "split": "ratio",
                "ratios": [0.5, 0.25, 0.25],
                "crop_size": 32,
                "samples_per_epoch": 4,
                "batch_size": 2,
                "num_workers": 0,
            }
        },
        "trainer": {
            "default_root_dir": str(tmp_path / "runs"),
            "accelerator": "cpu",
            "devices": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0},
                }
            ],
        },
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fit(config: str, epochs: int, *extra: str):
    return main(["fit", "--config", CLAF, "--config", config, "--trainer.max_epochs", str(epochs), *extra])


def test_resume_from_epoch_end_checkpoint_gives_the_same_weights(luna_tree, luna_cache, tmp_path):
    config = _config(tmp_path, luna_tree, luna_cache.root)
    straight = _fit(config, 4)
    assert straight.trainer.global_step == 8
    final = {k: v.clone() for k, v in straight.model.state_dict().items()}

    first_half = _fit(config, 2)
    checkpoint = Path(first_half.trainer.checkpoint_callback.last_model_path)
    assert checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["global_step"] == 4
    halfway = first_half.model.state_dict()

    resumed = _fit(config, 4, "--ckpt_path", str(checkpoint))
    assert resumed.trainer.global_step == 8
    weights = resumed.model.state_dict()
    assert weights.keys() == final.keys()
    changed = [k for k in final if final[k].is_floating_point() and not torch.equal(final[k], halfway[k])]
    assert changed, "epochs 3-4 change the weights, so agreement below is not trivial"
    for key, value in final.items():
        assert torch.allclose(weights[key].float(), value.float(), rtol=1e-5, atol=1e-6), key
