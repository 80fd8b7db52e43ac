"""Metric-learning training with structural similarity: the similarity the losses see is the structural
reranker's, batches are class-balanced and seeded, DDP equals one step on the union batch, and a killed run
resumes to the weights of an uninterrupted one."""
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrt_dist.features.base import Prepared
from rrt_dist.features.grid import DenseGrid
from rrt_dist.rerank.options import StructuralConfig
from rrt_dist.rerank.structural import structural_similarity, transport_plans
from rrt_dist.schema import LOSSES, MetricSettings
from rrt_dist.train.metric import (MetricEmbedder, Objective, class_balanced_batches, embed_features, embeddings,
                                   metric_step, optimizer_for, pack, set_train_mode, structural_matrix,
                                   structural_pairs, worker_share)

REPO = Path(__file__).resolve().parent.parent
STRUCTURAL = asdict(StructuralConfig())


def extractor() -> DenseGrid:
    torch.manual_seed(0)
    return DenseGrid(model="resnet18", pretrained=False, image_size=64, device="cpu")


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def random_cells(n: int, cells: int = 9, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    cells = torch.randn(n, cells, dim, generator=torch.Generator().manual_seed(seed))
    return embeddings(cells.mean(dim=1), cells)


def test_structural_similarity_in_training_is_the_rerankers():
    """(G + S) / 2 with S the structural reranker's score; the distance form uses the same transport plan."""
    g, p = random_cells(5)
    rows = pack(g, p)
    sim = structural_matrix(rows, rows, 16, STRUCTURAL, "cosine")
    dist = structural_matrix(rows, rows, 16, STRUCTURAL, "euclidean")
    for i in range(5):
        s = structural_similarity(p[i].numpy(), g[i].numpy(), p.numpy(), g.numpy(), **STRUCTURAL)
        np.testing.assert_allclose(sim[i].numpy(), (s + (g @ g[i]).numpy()) / 2, atol=1e-5)
        plan = transport_plans(p[i], g[i], p, g, **STRUCTURAL)["plan"].numpy()          # [M, R_ref, R_query]
        # DIML's distance: sqrt(squared distance + 1e-6)
        cell_d = np.sqrt(((p.numpy()[:, :, None, :] - p[i].numpy()[None, None, :, :]) ** 2).sum(-1) + 1e-6)
        global_d = np.sqrt(((g.numpy() - g[i].numpy()) ** 2).sum(-1) + 1e-6)
        np.testing.assert_allclose(dist[i].numpy(), (global_d + (plan * cell_d).sum(axis=(1, 2))) / 2, atol=1e-3)
    pairs = structural_pairs(rows, rows.flip(0), 16, STRUCTURAL, "euclidean")
    np.testing.assert_allclose(pairs.numpy(), dist[torch.arange(5), torch.arange(4, -1, -1)].numpy(), atol=1e-6)


def test_the_transport_plan_takes_no_gradient_the_cells_do():
    g, p = random_cells(4)
    p = p.clone().requires_grad_(True)
    rows = pack(g, p)
    structural_matrix(rows, rows, 16, STRUCTURAL, "cosine")[0, 1].backward()
    # S(0, 1) = sum_ab T[a, b] <p1[a], p0[b]> with T fixed: d/dp1[a] = sum_b T[a, b] p0[b]
    plan = transport_plans(p[0].detach(), g[0], p[1:2].detach(), g[1:2], **STRUCTURAL)["plan"][0]
    np.testing.assert_allclose(p.grad[1].numpy(), (plan @ p[0].detach()).numpy() / 2, atol=1e-5)
    assert torch.count_nonzero(p.grad[2:]) == 0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("structural", [False, True])
def test_each_loss_trains_the_embedding_on_a_fixed_batch(loss, structural):
    model = MetricEmbedder(extractor())
    set_train_mode(model, freeze_batchnorm=True)
    objective = Objective(MetricSettings(loss=loss, structural=structural), n_classes=4, dim=128,
                          structural=STRUCTURAL)
    optimizer = optimizer_for(model, objective, 1e-3, 0.0, 5e-4)
    images, labels = random_images(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    first = metric_step(model, objective, optimizer, images, labels, seed=0)["loss"]
    for step in range(1, 8):
        last = metric_step(model, objective, optimizer, images, labels, seed=step)
    assert first > 0 and last["loss"] < first
    if loss == "margin":                                # the per-class beta is trained
        assert not torch.allclose(objective.loss.beta, torch.full((4,), MetricSettings().beta))


def test_batchnorm_stays_frozen_when_asked():
    model = MetricEmbedder(extractor())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    set_train_mode(model, freeze_batchnorm=True)
    objective = Objective(MetricSettings(loss="multisimilarity"), 4, 128, STRUCTURAL)
    metric_step(model, objective, optimizer_for(model, objective, 1e-3, 0.0, 5e-4), random_images(8),
                torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), seed=0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    set_train_mode(model, freeze_batchnorm=False)
    assert all(m.training for m in model.modules())


def test_class_balanced_batches_are_seeded_and_split_in_whole_classes():
    labels = np.repeat(np.arange(12), [5] * 11 + [1])            # the last class has no pair: never drawn
    batches = class_balanced_batches(labels, 2, 8, seed=0, epoch=0)
    assert batches.shape == (len(labels) // 8, 8)
    for b in batches:
        assert len(set(b.tolist())) == 8
        pairs = labels[b].reshape(4, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all() and len(set(pairs[:, 0].tolist())) == 4 and 11 not in pairs
    np.testing.assert_array_equal(batches, class_balanced_batches(labels, 2, 8, seed=0, epoch=0))
    assert not np.array_equal(batches, class_balanced_batches(labels, 2, 8, seed=0, epoch=1))
    halves = [worker_share(batches, r, 2, 2) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), batches)
    with pytest.raises(ValueError, match="whole"):
        worker_share(batches, 0, 8, 2)
    with pytest.raises(ValueError, match="needs 12 classes"):      # 11 classes have a pair
        class_balanced_batches(labels, 2, 24, seed=0, epoch=0)


LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def ddp_metric_worker(config):
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = MetricEmbedder(extractor())
    set_train_mode(model, freeze_batchnorm=True)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    objective = Objective(MetricSettings(loss=config["loss"]), 4, 128, STRUCTURAL)
    optimizer = optimizer_for(model, objective, 1e-3, 4e-4, 5e-4)
    share = slice(rank * 4, (rank + 1) * 4)
    metric_step(model, objective, optimizer, random_images(8)[share], LABELS[share], seed=7, world_size=world)
    module = getattr(model, "module", model)
    torch.save({"grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
                "params": module.state_dict(), "objective": objective.state_dict()},
               Path(config["out"]) / f"rank{rank}.pt")


@pytest.mark.parametrize("loss", ["margin", "multisimilarity"])
def test_ddp_step_on_two_workers_equals_one_step_on_the_union_batch(local_ray, tmp_path, loss):
    """G+S loss with its miner over the gathered batch (margin: seeded distance-weighted triplets and the
    per-class beta, trained outside DDP)."""
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/
    TorchTrainer(ddp_metric_worker, train_loop_config={"loss": loss, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    model = MetricEmbedder(extractor())
    set_train_mode(model, freeze_batchnorm=True)
    objective = Objective(MetricSettings(loss=loss), 4, 128, STRUCTURAL)
    optimizer = optimizer_for(model, objective, 1e-3, 4e-4, 5e-4)
    metric_step(model, objective, optimizer, random_images(8), LABELS, seed=7)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-4, atol=1e-5)
    for r in ranks:
        for name, value in objective.state_dict().items():
            torch.testing.assert_close(r["objective"][name], value, rtol=1e-5, atol=1e-6)
    if loss == "margin":
        # beta moved, and alike
        assert not torch.allclose(objective.loss.beta, torch.full((4,), MetricSettings().beta))


@pytest.fixture(scope="module")
def metric_cfg(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    import rrt_dist.config  # noqa: F401

    root = tmp_path_factory.mktemp("metric")
    overrides = ["experiment=ml_synthetic", f"dataset.root={root / 'syn'}", f"features_dir={root / 'features'}",
                 "dataset.n_landmarks=6", "dataset.n_val_landmarks=0", "dataset.n_train_landmarks=16",
                 "dataset.views_per_landmark=3", "dataset.train_views_per_landmark=4", "dataset.n_distractors=0",
                 "backbone.options.image_size=64", "train.batch_size=8", "train.val_holdout_labels=4",
                 "train.epochs=2", "train.lr=1e-3", "train.metric.loss=margin", f"train.storage_path={root / 'runs'}",
                 "ray.num_cpus=2"]

    def make(out: str, *extra: str):
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            return compose("config", overrides=overrides + [f"output_dir={root / out}", *extra])
    return make


def final_state(run: str) -> dict:
    return torch.load(Path(run) / "epoch_002" / "metric.pt", weights_only=True)


def test_images_that_do_not_decode_are_left_out_of_metric_training(local_ray, metric_cfg, tmp_path, caplog):
    """A truncated training image and one that is no image at all (one in a held-out class) are found before
    training and left out with a warning; every other image stays, held-out classes included. Once repaired they
    are back, under another run name than the first run's (their files changed): no resume onto other pixels."""
    from rrt_dist.datasets import load_training_set
    from rrt_dist.pipelines.train import metric_run_name, metric_training_set

    cfg = metric_cfg("bad-images", f"dataset.root={tmp_path / 'syn'}")
    _, manifest = load_training_set(cfg.dataset)
    rows, val = metric_training_set(cfg)
    name = metric_run_name(cfg, rows, val)
    assert metric_run_name(cfg, rows, val) == name                       # nothing changed: the same run resumes
    held_id = int(val["bench"].gallery.column("id")[0].as_py())
    uri_of = dict(zip(manifest.column("id").to_pylist(), manifest.column("uri").to_pylist()))
    truncated, garbage = int(rows["ids"][5]), held_id
    originals = {i: Path(uri_of[i]).read_bytes() for i in (truncated, garbage)}
    Path(uri_of[truncated]).write_bytes(originals[truncated][:len(originals[truncated]) // 3])
    Path(uri_of[garbage]).write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        rows_after, val_after = metric_training_set(cfg)
    assert "2 of 64 images do not decode" in caplog.text and uri_of[truncated] in caplog.text
    assert set(rows["ids"].tolist()) - set(rows_after["ids"].tolist()) == {truncated}
    held_after = val_after["bench"].gallery.column("id").to_pylist()
    assert garbage not in held_after and len(held_after) == val["bench"].gallery.num_rows - 1
    assert val_after["images"].shape[0] == len(held_after)
    for i, data in originals.items():
        Path(uri_of[i]).write_bytes(data)
    rows_fixed, val_fixed = metric_training_set(cfg)
    assert np.array_equal(rows_fixed["ids"], rows["ids"]) and val_fixed["bench"].gallery.equals(val["bench"].gallery)
    assert metric_run_name(cfg, rows_fixed, val_fixed) not in (name, metric_run_name(cfg, rows_after, val_after))


def test_metric_training_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(local_ray, metric_cfg):
    """Ray Data streams class-balanced batches to 2 workers; validation is on held-out training classes only;
    a worker killed at epoch 2 resumes from epoch 1's checkpoint and ends where an uninterrupted run ends;
    the export is a working extractor."""
    from rrt_dist.pipelines.train import metric_training_set, train_metric

    cfg = metric_cfg("clean", "train.name=clean")
    rows, val = metric_training_set(cfg)
    assert len(np.unique(rows["labels"])) == 12 and len(rows["labels"]) == 48
    held = set(val["bench"].gallery.column("label").to_pylist())
    assert len(held) == 4 and val["images"].shape == (16, 64, 64, 3)
    assert not set(val["bench"].gallery.column("id").to_pylist()) & set(rows["ids"].tolist())   # never trained on

    clean = train_metric(cfg, cfg.output_dir)
    killed_cfg = metric_cfg("killed", "train.name=killed", "train.fail_at_epoch=1")
    killed = train_metric(killed_cfg, killed_cfg.output_dir)
    assert [h["epoch"] for h in clean["history"]] == [1, 2] == [h["epoch"] for h in killed["history"]]
    assert killed["history"][-1]["resumed_after"] == 1
    assert all(0 <= h["val_score"] <= 1 and h["steps"] == 6 for h in clean["history"])
    a, b = final_state(clean["run"]), final_state(killed["run"])
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["objective"]["loss.beta"], b["objective"]["loss.beta"])
    beta = a["objective"]["loss.beta"]
    assert not torch.allclose(beta, torch.full_like(beta, MetricSettings().beta))

    model = MetricEmbedder(DenseGrid(**{**cfg.backbone.options, "device": "cpu"})).eval()
    best = Path(clean["run"]) / f"epoch_{clean['best_epoch']:03d}" / "metric.pt"
    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    exported = DenseGrid(**{**cfg.backbone.options, "device": "cpu", **clean["backbone"]})
    rgb = np.random.default_rng(3).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    stored = exported.extract([Prepared(image=x, factor=(1.0, 1.0), offset=(0, 0)) for x in rgb])
    expected = embed_features(model, rgb)
    for i, f in enumerate(stored):
        np.testing.assert_allclose(f.global_, expected["global"][i], atol=1e-4)
        np.testing.assert_allclose(f.local, expected["local"][i], atol=1e-4)


def test_test_transform_resizes_the_shorter_side_then_crops_the_centre():
    """backbone.options.resize=256 with image_size=224: torchvision's Resize(256) + CenterCrop(224); stored
    positions map back to the original image."""
    import torchvision.transforms.functional as TF

    y, x = np.mgrid[0:300, 0:400]
    rgb = np.stack([x * 0.6, y * 0.8, 128 + 100 * np.sin(x / 30) * np.cos(y / 40)], -1).astype(np.uint8)
    prepare = DenseGrid.preparer(model="resnet18", image_size=224, resize=256)
    prepared = prepare(rgb)
    assert prepared.image.shape == (224, 224, 3)
    reference = TF.center_crop(TF.resize(torch.from_numpy(rgb).permute(2, 0, 1), 256, antialias=True), 224)
    assert np.abs(prepared.image.astype(int) - reference.permute(1, 2, 0).numpy().astype(int)).mean() < 1
    # the prepared image's centre is the original's centre; its corner is the crop's corner
    from rrt_dist.features.base import ImageFeatures, to_original

    cells = ImageFeatures(np.zeros(4, np.float32), np.zeros((2, 4), np.float32),
                          np.array([[112.0, 112.0], [0.0, 0.0]], np.float32), np.zeros(2, np.int64))
    np.testing.assert_allclose(to_original(cells, prepared).positions,
                               [[200.0, 150.0], [200 - 112 * 300 / 256, 150 - 112 * 300 / 256]], atol=1.0)
    assert DenseGrid.preparer(model="resnet18", image_size=224)(rgb).image.shape == (224, 224, 3)   # default: squash


def test_a_vit_trains_with_its_cls_token_as_global_and_exports_what_the_vit_extractor_loads(tmp_path):
    """The ViT-reranking paper's transformers (CvT-13; here a random ViT-Tiny from timm): CLS token and pooled
    patch tokens through trainable projections; every layer trains (no BatchNorm to freeze)."""
    from rrt_dist.features.grid import ViTTokens
    from rrt_dist.train.metric import export_extractor

    options = {"model": "vit_tiny_patch16_224", "pretrained": False, "dim": 32, "device": "cpu"}
    torch.manual_seed(0)
    model = MetricEmbedder(ViTTokens(**options))
    assert model.project_global is not None
    set_train_mode(model, freeze_batchnorm=False)
    objective = Objective(MetricSettings(loss="multisimilarity"), 4, 32, {**STRUCTURAL, "center": "cls",
                                                                          "weighting": "inverse"})
    optimizer = optimizer_for(model, objective, 1e-4, 0.0, 5e-4)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        metric_step(model, objective, optimizer, images, LABELS, seed=step)
    trained = model.state_dict()
    for key in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "project.weight",
                "project_global.weight"):
        assert not torch.equal(trained[key], start[key]), key

    exported = export_extractor(model.eval(), tmp_path)
    assert exported["global_projection"] != exported["local_projection"]
    extractor = ViTTokens(**{**options, **exported})
    rgb = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    stored = extractor.extract([Prepared(image=x, factor=(1.0, 1.0), offset=(0, 0)) for x in rgb])
    expected = embed_features(model, rgb)
    for i, f in enumerate(stored):
        np.testing.assert_allclose(f.global_, expected["global"][i], atol=1e-4)
        np.testing.assert_allclose(f.local, expected["local"][i], atol=1e-4)
    with pytest.raises(ValueError, match="backbone.options.dim"):
        MetricEmbedder(ViTTokens(**{**options, "dim": None}))


def test_a_pair_with_no_transportable_mass_scores_zero_not_nan():
    """Cells all anti-correlated with the other image's centre leave a marginal without mass (seen in training:
    one NaN similarity made every weight NaN). Nothing is transported: structural score 0, gradient finite."""
    gen = torch.Generator().manual_seed(0)
    d = F.normalize(torch.randn(16, generator=gen), dim=0)
    noise = 0.1 * torch.randn(3, 9, 16, generator=gen)
    cells = torch.stack([d + noise[0], -d + noise[1], torch.randn(9, 16, generator=gen)])   # image 1 opposes image 0
    g, p = embeddings(cells.mean(dim=1), cells)
    p = p.clone().requires_grad_(True)
    parts = transport_plans(p[0].detach(), g[0], p[1:2].detach(), g[1:2], **{**STRUCTURAL, "center": "mean"})
    assert parts["u"].sum() == 0 and parts["v"].sum() == 0 and parts["plan"].abs().sum() == 0
    rows = pack(g, p)
    sim = structural_matrix(rows, rows, 16, {**STRUCTURAL, "center": "mean"}, "cosine")
    assert torch.isfinite(sim).all()
    sim.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_cvt13_trains_every_layer_and_exports_a_model_folder_the_vit_extractor_loads(tmp_path):
    """CvT-13 (random weights; the cvt extra): BatchNorm included in training, as the paper finetunes every layer."""
    pytest.importorskip("transformers")
    from rrt_dist.features.grid import ViTTokens
    from rrt_dist.train.metric import export_extractor

    options = {"model": "cvt-13", "pretrained": False, "dim": 32, "device": "cpu"}
    torch.manual_seed(0)
    model = MetricEmbedder(ViTTokens(**options))
    set_train_mode(model, freeze_batchnorm=False)
    running = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    assert running
    objective = Objective(MetricSettings(loss="margin"), 4, 32, {**STRUCTURAL, "center": "cls", "weighting": "inverse"})
    metric_step(model, objective, optimizer_for(model, objective, 1e-4, 0.0, 5e-4),
                torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1)), LABELS, seed=0)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in running.items())   # BatchNorm trains too

    exported = export_extractor(model.eval(), tmp_path)
    assert Path(exported["checkpoint"]).is_dir()
    extractor = ViTTokens(**{**options, **exported})
    rgb = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    stored = extractor.extract([Prepared(image=x, factor=(1.0, 1.0), offset=(0, 0)) for x in rgb])
    expected = embed_features(model, rgb)
    for i, f in enumerate(stored):
        np.testing.assert_allclose(f.global_, expected["global"][i], atol=1e-4)
        np.testing.assert_allclose(f.local, expected["local"][i], atol=1e-4)
