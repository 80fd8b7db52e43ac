"""Joint backbone + RRT model (SOP setting): same locals as the extractor, and the two training stages."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrt_dist.features.base import Prepared, image_tensor
from rrt_dist.features.grid import DenseGrid
from rrt_dist.train.joint import JointReranker, set_stage


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
