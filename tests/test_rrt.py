"""RRT: the paper's parameter count, and equality with an independent re-statement of the released forward pass."""
import math

import numpy as np
import pytest
import torch

from rrt_dist.models.rrt import RerankingTransformer, count_parameters, load_released_checkpoint


def test_parameter_count_matches_the_paper():
    # remap 2048*128+128, scale 7*128, segments 6*128, 6 x (in_proj 3*128*128+384, out 128*128+128,
    # MLP 128*1024+1024 + 1024*128+128, 2 LayerNorms 4*128), classifier 129
    expected = 262_272 + 896 + 768 + 6 * (49_536 + 16_512 + 132_096 + 131_200 + 512) + 129
    assert expected == 2_243_201
    assert count_parameters(RerankingTransformer()) == 2_243_201


def reference_forward(sd, src_g, src_l, src_m, src_s, tgt_g, tgt_l, tgt_m, tgt_s, layers=6, heads=4):
    """Eq. 1-4 written out token by token (with the released model's residual around the MLP)."""
    def l2n(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def layer_norm(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    seg, scale = sd["seg_encoder.weight"], sd["scale_encoder.weight"]
    out = []
    for i in range(src_l.shape[0]):
        keep_s = [j for j in range(src_l.shape[1]) if not src_m[i, j]]    # padded locals are left out entirely
        keep_t = [j for j in range(tgt_l.shape[1]) if not tgt_m[i, j]]
        g = l2n(src_g[i] @ sd["remap.weight"].T + sd["remap.bias"]) + seg[4]
        g2 = l2n(tgt_g[i] @ sd["remap.weight"].T + sd["remap.bias"]) + seg[5]
        tokens = [seg[2], g] + [l2n(src_l[i, j]) + scale[src_s[i, j]] + seg[0] for j in keep_s] + \
                 [seg[3], g2] + [l2n(tgt_l[i, j]) + scale[tgt_s[i, j]] + seg[1] for j in keep_t]
        x = torch.stack(tokens)
        for n in range(layers):
            p = f"encoder.layers.{n}."
            qkv = x @ sd[p + "self_attn.in_proj_weight"].T + sd[p + "self_attn.in_proj_bias"]
            q, k, v = qkv.split(x.shape[1], dim=-1)
            dh = x.shape[1] // heads
            heads_out = []
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                att = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(dh), dim=-1)
                heads_out.append(att @ v[:, sl])
            mha = torch.cat(heads_out, -1) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
            x = layer_norm(x + mha, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            mlp = torch.relu(x @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"]) @ sd[p + "linear2.weight"].T \
                + sd[p + "linear2.bias"]
            x = layer_norm(x + mlp, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        out.append(x[0] @ sd["classifier.weight"][0] + sd["classifier.bias"][0])
    return torch.stack(out)


def pair_batch(seed, b=3, n=12):
    g = torch.Generator().manual_seed(seed)
    src_m = torch.zeros(b, n, dtype=torch.bool)
    tgt_m = torch.zeros(b, n, dtype=torch.bool)
    src_m[0, 7:] = True          # 7 real locals
    tgt_m[1, 3:] = True          # 3 real locals
    tgt_m[2, 10:] = True
    return (torch.randn(b, 2048, generator=g), torch.randn(b, n, 128, generator=g), src_m,
            torch.randint(0, 7, (b, n), generator=g), torch.randn(b, 2048, generator=g),
            torch.randn(b, n, 128, generator=g), tgt_m, torch.randint(0, 7, (b, n), generator=g))


def randomised_model(seed=0):
    torch.manual_seed(seed)
    model = RerankingTransformer().eval()
    with torch.no_grad():               # LayerNorm / biases away from their init, so every term matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_forward_equals_the_restated_equations_with_padding():
    model = randomised_model()
    batch = pair_batch(1)
    with torch.no_grad():
        logits = model(*batch)
        reference = reference_forward(model.state_dict(), *batch)
    assert logits.shape == (3,)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    # padded content never reaches the output
    src_g, src_l, src_m, src_s, tgt_g, tgt_l, tgt_m, tgt_s = batch
    noisy_l, noisy_s = src_l.clone(), src_s.clone()
    noisy_l[src_m] = 1e3 * torch.randn_like(noisy_l[src_m])
    noisy_s[src_m] = 6
    with torch.no_grad():
        torch.testing.assert_close(model(src_g, noisy_l, src_m, noisy_s, tgt_g, tgt_l, tgt_m, tgt_s), logits,
                                   atol=1e-5, rtol=1e-5)


def test_the_classification_tokens_attention_is_what_multihead_attention_computes():
    """What the results browser draws for an RRT pair: the last layer's attention of the classification token to
    each local, checked against torch's own MultiheadAttention weights (same parameters) on the same input; the
    logits are the model's, padded locals get none, and the scorer hands it out per candidate with positions."""
    from rrt_dist.rerank.scorers import RRTScorer

    model = randomised_model(4)
    batch = pair_batch(5)
    src_m, tgt_m = batch[2], batch[6]
    with torch.no_grad():
        logits, to_src, to_tgt = model.cls_attention(*batch)
        torch.testing.assert_close(logits, model(*batch), atol=1e-5, rtol=1e-5)
        x, allowed, src_start, tgt_start = model._tokens(*batch)
        for layer in model.encoder.layers[:-1]:
            x = layer(x, allowed)
        _, weights = model.encoder.layers[-1].self_attn(x, x, x, key_padding_mask=~allowed, need_weights=True,
                                                        average_attn_weights=True)
    torch.testing.assert_close(to_src, weights[:, 0, src_start:src_start + 12], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(to_tgt, weights[:, 0, tgt_start:tgt_start + 12], atol=1e-6, rtol=1e-5)
    assert torch.all(to_src[src_m] == 0) and torch.all(to_tgt[tgt_m] == 0)
    assert torch.all(to_src.sum(1) + to_tgt.sum(1) < 1 + 1e-6)           # the rest goes to CLS, globals, SEP

    rng = np.random.default_rng(0)
    query = {"global": rng.normal(size=2048), "local": rng.normal(size=(12, 128)), "mask": np.arange(12) >= 7,
             "scales": np.zeros(12, np.int64), "positions": rng.uniform(0, 99, (12, 2)), "n_local": np.int64(7)}
    cands = {"global": rng.normal(size=(2, 2048)), "local": rng.normal(size=(2, 12, 128)),
             "mask": np.stack([np.arange(12) >= 12, np.arange(12) >= 3]), "scales": np.zeros((2, 12), np.int64),
             "positions": rng.uniform(0, 99, (2, 12, 2)), "n_local": np.array([12, 3])}
    scorer = RRTScorer(model=model, device="cpu")
    found = scorer.explain(query, cands)
    assert [len(f["query_weights"]) for f in found] == [7, 7] and [len(f["cand_weights"]) for f in found] == [12, 3]
    assert found[1]["cand_weights"][0][:2] == pytest.approx(cands["positions"][1, 0].tolist())
    assert all(f["matches"] == [] for f in found)


def test_load_released_checkpoint_layouts(tmp_path):
    model = randomised_model(3)
    batch = pair_batch(2)
    with torch.no_grad():
        expected = model(*batch)
    torch.save({"state": {f"module.{k}": v for k, v in model.state_dict().items()}, "optim": {}},
               tmp_path / "released.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    for name in ("released.pth", "bare.pth"):
        loaded = load_released_checkpoint(tmp_path / name)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(*batch), expected, atol=1e-6, rtol=1e-6)
    broken = dict(model.state_dict())
    broken.pop("classifier.bias")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="classifier.bias"):
        load_released_checkpoint(tmp_path / "broken.pth")


def test_sop_setting_without_globals_and_with_sine_positions():
    model = RerankingTransformer(use_global=False, position_encoding="sine2d").eval()
    assert not hasattr(model, "remap") and not hasattr(model, "scale_encoder")
    b, n = 2, 49
    pos = torch.rand(b, n, 2) * 224
    mask = torch.zeros(b, n, dtype=torch.bool)
    local = torch.randn(b, n, 128)
    with torch.no_grad():
        out = model(None, local, mask, None, None, local.flip(1), mask, None, src_positions=pos,
                    tgt_positions=pos.flip(1))
        shuffled = model(None, local, mask, None, None, local.flip(1), mask, None, src_positions=pos.roll(1, 1),
                         tgt_positions=pos.flip(1))
    assert out.shape == (2,) and not torch.allclose(out, shuffled)   # positions matter
    with pytest.raises(ValueError, match="src_positions"):
        model(None, local, mask, None, None, local, mask, None)


def test_sop_checkpoint_loads_and_the_scorer_feeds_it_positions(tmp_path):
    from rrt_dist.rerank.scorers import RRTScorer

    torch.manual_seed(0)
    model = RerankingTransformer(use_global=False, position_encoding="sine2d").eval()
    torch.save({"state": model.state_dict()}, tmp_path / "sop.pt")
    loaded = load_released_checkpoint(tmp_path / "sop.pt")          # no scale embedding: the SOP setting
    assert loaded.cfg.position_encoding == "sine2d" and not loaded.cfg.use_global
    rng = np.random.default_rng(1)
    k, n = 3, 5

    def image(count):
        return {"global": np.zeros((count, 4), np.float32), "local": rng.normal(size=(count, n, 128)).astype(np.float32),
                "positions": rng.uniform(0, 224, size=(count, n, 2)).astype(np.float32),
                "scales": np.zeros((count, n), np.int64), "mask": np.zeros((count, n), bool),
                "n_local": np.full(count, n)}
    query, cands = {key: v[0] for key, v in image(1).items()}, image(k)
    scores = RRTScorer(model=loaded, device="cpu")(query, cands)
    with torch.no_grad():
        expected = model(None, torch.as_tensor(query["local"]).expand(k, -1, -1), torch.zeros(k, n, dtype=torch.bool),
                         None, None, torch.as_tensor(cands["local"]), torch.zeros(k, n, dtype=torch.bool), None,
                         src_positions=torch.as_tensor(query["positions"]).expand(k, -1, -1),
                         tgt_positions=torch.as_tensor(cands["positions"]))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_the_scorer_takes_its_global_weight_from_the_checkpoint_unless_told(tmp_path):
    from rrt_dist.rerank.options import RRTOptions
    from rrt_dist.rerank.scorers import RRTScorer

    model = RerankingTransformer(global_dim=8)
    torch.save({"state": model.state_dict(), "max_local": 5, "global_weight": 4.0}, tmp_path / "fused.pt")
    torch.save({"state": model.state_dict(), "max_local": 5}, tmp_path / "older.pt")
    assert RRTOptions().global_weight is None                                 # the checkpoint's by default
    assert RRTScorer(tmp_path / "fused.pt", device="cpu").global_weight == 4.0    # None: the run's choice
    assert RRTScorer(tmp_path / "fused.pt", device="cpu", global_weight=0.0).global_weight == 0.0
    assert RRTScorer(tmp_path / "older.pt", device="cpu").global_weight == 0.0    # chose none


def test_the_scorer_feeds_the_model_its_top_locals_when_asked():
    """``reranker.rrt.top_locals``: each image's first m locals, as if only those were stored (padding masked)."""
    from rrt_dist.rerank.scorers import RRTScorer

    torch.manual_seed(0)
    model = RerankingTransformer().eval()
    rng = np.random.default_rng(2)
    k, n, m = 3, 6, 4

    def images(count, n_local):
        local = rng.normal(size=(count, n, 128)).astype(np.float32)
        mask = np.arange(n)[None, :] >= n_local[:, None]
        local[mask] = 0
        return {"global": rng.normal(size=(count, 2048)).astype(np.float32), "local": local,
                "positions": np.zeros((count, n, 2), np.float32), "scales": rng.integers(0, 7, (count, n)),
                "mask": mask, "n_local": n_local}
    query = {key: v[0] for key, v in images(1, np.array([n])).items()}
    cands = images(k, np.array([n, 5, 2]))
    scores = RRTScorer(model=model, device="cpu", top_locals=m)(query, cands)

    def as_stored(features):                 # what a table holding only the first m locals returns
        out = {key: v[..., :m] if key in ("mask", "scales") else v[..., :m, :] if key in ("local", "positions")
               else v for key, v in features.items()}
        return {**out, "n_local": np.minimum(features["n_local"], m)}
    expected = RRTScorer(model=model, device="cpu")(as_stored(query), as_stored(cands))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(scores, RRTScorer(model=model, device="cpu")(query, cands), atol=1e-4)


def test_a_checkpoint_that_is_not_an_rrt_is_refused_before_any_work(tmp_path):
    """Random bytes or another model's tensors end at start-up with one line naming the key and the file, and
    never with torch's advice to load without weights_only."""
    import os

    from hydra import compose, initialize_config_dir

    from rrt_dist.config import CONFIG_DIR
    from rrt_dist.models.rrt import check_checkpoint
    from rrt_dist.pipelines.evaluate import check_evaluation
    from rrt_dist.schema import ConfigError

    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"state": torch.nn.Linear(3, 4).state_dict()}, tmp_path / "linear.pt")
    torch.save({"state": RerankingTransformer(global_dim=320).state_dict()}, tmp_path / "rrt.pt")
    with pytest.raises(ConfigError, match=r"reranker.checkpoint=.*random.pt: not a PyTorch checkpoint") as err:
        check_checkpoint(str(tmp_path / "random.pt"))
    assert "weights_only" not in str(err.value)
    with pytest.raises(ConfigError, match=r"linear.pt: not an RRT checkpoint \(Missing key\(s\).*Unexpected key\(s\).*weight"):
        check_checkpoint(str(tmp_path / "linear.pt"))
    check_checkpoint(str(tmp_path / "rrt.pt"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["reranker=rrt", f"reranker.checkpoint={tmp_path / 'linear.pt'}"])
    with pytest.raises(ConfigError, match="not an RRT checkpoint"):
        check_evaluation(cfg)                 # evaluate's first step: before the benchmark is read or Ray starts
