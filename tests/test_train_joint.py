"""Joint backbone + RRT (SOP setting): same locals as the extractor, the two stages, and training from images."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrt_dist.features.base import Prepared, image_tensor
from rrt_dist.features.grid import DenseGrid
from rrt_dist.train.joint import JointReranker, set_stage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return DenseGrid(model="resnet18", pretrained=False, image_size=64, device="cpu")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def batch(extractor, rgb) -> torch.Tensor:
    return torch.cat([image_tensor(x, extractor.cfg.mean, extractor.cfg.std, "cpu") for x in rgb])


def test_joint_locals_are_the_extractors_locals(extractor):
    rgb = images(3)
    model = JointReranker(extractor).eval()
    with torch.no_grad():
        joint = model.locals(batch(extractor, rgb)).numpy()
    stored = extractor.extract([Prepared(image=x, factor=(1.0, 1.0), offset=(0, 0)) for x in rgb])
    for j, f in zip(joint, stored):
        np.testing.assert_allclose(j, f.local, atol=1e-5)
    np.testing.assert_allclose(model.positions.numpy(), stored[0].positions)
    assert not hasattr(model.rrt, "remap") and model.rrt.cfg.position_encoding == "sine2d"


def one_step(model, x):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    src, tgt = torch.tensor([0, 0]), torch.tensor([1, 2])
    loss = F.binary_cross_entropy_with_logits(model(x, src, tgt), torch.tensor([1.0, 0.0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("stage", ["frozen", "finetune"])
def test_stages_train_what_they_should_and_keep_batchnorm_statistics(extractor, stage):
    model = JointReranker(extractor)
    x = batch(extractor, images(3, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_stage(model, stage)
    one_step(model, x)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    running = {k for k in before if k.startswith("backbone.") and ("running_" in k or "num_batches" in k)}
    backbone_weights = {k for k in before if k.startswith("backbone.") and k not in running}
    assert not changed & running                                   # BatchNorm statistics never move
    assert "project.weight" in changed and any(k.startswith("rrt.") for k in changed)
    if stage == "frozen":
        assert not changed & backbone_weights
    else:
        assert "backbone.conv1.weight" in changed and "backbone.layer4.1.bn2.weight" in changed  # (timm zero-inits it)


def test_unknown_stage_is_rejected(extractor):
    with pytest.raises(ValueError, match="stage"):
        set_stage(JointReranker(extractor), "thaw")


def test_training_crops_are_seeded_and_sized():
    from rrt_dist.train.joint import train_crop

    rgb = images(1, seed=2)[0]
    a, b, c = (train_crop(rgb, 32, (0.25, 1.0), s) for s in (7, 7, 8))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_joint_training_runs_both_stages_from_images_and_exports_the_extractor(local_ray, small_dataset, tmp_path):
    """Ray Data streams augmented triplets to 2 Ray Train workers; the finetune stage starts from the
    frozen stage's best weights; validation re-extracts locals; the export is a working extractor."""
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401
    from rrt_dist.models.rrt import load_released_checkpoint
    from rrt_dist.pipelines.train import train_rrt

    overrides = [*small_dataset, f"features_dir={tmp_path / 'f'}", "backbone=dense_grid_r50", "backbone.options.model=resnet18", "backbone.options.pretrained=false",
                 "backbone.options.image_size=64", "train=rrt_sop_joint", "train.epochs=1", "train.milestones=[]",
                 "train.batch_size=4", "train.min_positives=2", "train.val_depth=10", "ray.train.num_cpus=0.5",
                 f"train.storage_path={tmp_path / 'runs'}", "train.name=joint", "ray.num_cpus=2"]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides + [f"output_dir={tmp_path / 'out'}"])
    out = train_rrt(cfg, cfg.output_dir)
    assert [(h["epoch"], h["stage"]) for h in out["history"]] == [(1, "frozen"), (2, "finetune")]
    assert all(0.0 <= h["val_score"] <= 1.0 and h["steps"] > 0 for h in out["history"])

    torch.manual_seed(0)
    initial = JointReranker(DenseGrid(model="resnet18", pretrained=False, image_size=64, device="cpu")).state_dict()
    frozen = torch.load(tmp_path / "out" / "joint_frozen.pt")
    finetuned = torch.load(tmp_path / "out" / "joint_finetune.pt")
    backbone = [k for k in initial if k.startswith("backbone.")]
    running = [k for k in backbone if "running_" in k]
    assert all(torch.equal(frozen[k], initial[k]) for k in backbone)           # frozen: the backbone as it was
    assert not torch.equal(frozen["rrt.classifier.weight"], initial["rrt.classifier.weight"])
    assert not torch.equal(finetuned["backbone.conv1.weight"], frozen["backbone.conv1.weight"])
    assert all(torch.equal(finetuned[k], initial[k]) for k in running)         # BatchNorm statistics kept

    rrt = load_released_checkpoint(out["checkpoint"])                          # the reranker, released layout
    assert rrt.cfg.position_encoding == "sine2d" and not rrt.cfg.use_global
    model = JointReranker(DenseGrid(model="resnet18", pretrained=False, image_size=64, device="cpu")).eval()
    model.load_state_dict(finetuned)
    exported = DenseGrid(model="resnet18", image_size=64, device="cpu", **out["backbone"])
    rgb = images(2, seed=4)
    with torch.no_grad():
        expected = model.locals(batch(exported, rgb)).numpy()
    stored = exported.extract([Prepared(image=x, factor=(1.0, 1.0), offset=(0, 0)) for x in rgb])
    for e, f in zip(expected, stored):
        np.testing.assert_allclose(f.local, e, atol=1e-4)

    again = train_rrt(cfg, cfg.output_dir)                                     # both runs finished: nothing retrained
    assert again["history"] == out["history"]
