"""Hydra structured configs: the defaults compose, overrides validate, and mistakes fail clearly."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

import rrt_dist.config  # noqa: F401
from rrt_dist.cli import available_jobs
from rrt_dist.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent


def make(overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_the_embedded_demo():
    cfg = make()
    assert cfg.dataset.name == "synthetic" and cfg.dataset.distractors.name == "synthetic"
    assert cfg.ray.address is None and cfg.backbone.name == "multiscale-cnn"
    assert cfg.backbone.options.model == "tf_efficientnet_lite0"   # shipped weights, no network
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 5e-4 and cfg.train.batch_size == 12


def test_dataset_switch_and_r1m_distractors():
    cfg = make(["dataset=roxford5k", "dataset.root=/data/roxf", "dataset/distractors=r1m",
                "dataset.distractors.limit=1000"])
    assert cfg.dataset.name == "roxford5k" and cfg.dataset.root == "/data/roxf"
    assert cfg.dataset.distractors.name == "r1m" and cfg.dataset.distractors.limit == 1000
    assert make(["dataset=msls"]).dataset.cities == ["cph", "sf"]


def test_experiment_presets_compose():
    cfg = make(["experiment=synthetic_small"])
    assert cfg.dataset.n_landmarks == 12 and cfg.dataset.root == "data/synthetic-small"


@pytest.mark.parametrize("override, key", [("dataset.n_landmark=3", "n_landmark"), ("index.factroy=Flat", "factroy"),
                                           ("dataset.distractors.limt=5", "limt")])
def test_unknown_keys_fail_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        make([override])
    assert key in str(err.value) + str(err.value.__cause__)


def test_msls_key_is_not_valid_for_synthetic():
    with pytest.raises(ConfigCompositionException, match="radius_m"):
        make(["dataset.radius_m=10"])


def test_wrong_types_fail():
    with pytest.raises(ConfigCompositionException) as err:
        make(["dataset.n_landmarks=many"])
    assert isinstance(err.value.__cause__, (ValidationError, ConfigAttributeError))


def test_cli_lists_jobs_and_rejects_unknown(capsys):
    assert "evaluate" in available_jobs()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["nosuchjob"])
    assert exit_.value.code == 2 and "unknown job 'nosuchjob'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0 and "evaluate" in capsys.readouterr().out


@pytest.mark.parametrize("preset, backbone, weighting", [("structural_r50", "dense-grid", "correlation"),
                                                         ("structural_deit_s", "vit", "inverse"),
                                                         ("structural_swin_t", "vit", "correlation"),
                                                         ("structural_cvt13", "vit", "inverse")])
def test_structural_presets_compose_and_validate(preset, backbone, weighting):
    from rrt_dist.config import validate_config

    cfg = make([f"experiment={preset}", "dataset=cub200", "dataset.root=/data/cub200"])
    validate_config(cfg)
    assert cfg.backbone.name == backbone and cfg.reranker.structural.weighting == weighting
    assert list(cfg.reranker.methods) == ["global", "structural"]


@pytest.mark.parametrize("preset, dataset", [("r1m_roxford", "roxford5k"), ("r1m_rparis", "rparis6k")])
def test_r1m_presets_are_the_papers_delg_setting_with_an_exact_metric(preset, dataset, tmp_path):
    from rrt_dist.config import validate_config

    weights = tmp_path / "rrt.pt"
    weights.write_bytes(b"")
    cfg = make([f"experiment={preset}", f"reranker.checkpoint={weights}"])
    validate_config(cfg)
    assert cfg.dataset.name == dataset and cfg.dataset.distractors.name == "r1m"
    assert cfg.backbone.options.model == "resnet50" and cfg.index.factory == "auto" and cfg.index.mode == "exact"
    assert cfg.reranker.depth == 100 and {"rrt", "gv", "global"} <= set(cfg.reranker.methods)


def test_storage_root_places_everything_jobs_store(monkeypatch, tmp_path):
    """One key moves tables, indexes, galleries, training runs and views (a URI too); a submitted job's report
    is copied under it, a local run's only where outputs_root says."""
    from rrt_dist.config import validate_config
    from rrt_dist.features.images import join_location
    from rrt_dist.runtime import SUBMITTED_JOB_ENV, outputs_destination, publish_outputs
    from rrt_dist.schema import ConfigError

    default = make()
    assert (default.features_dir, default.index.dir, default.train.storage_path, default.gallery.root,
            default.train.selfsup.root) == ("data/features", "data/indexes", "data/train", "data/galleries", "data/selfsup")
    cfg = make(["storage_root=s3://bucket/rrt", "index.dir=/fast/indexes"])
    validate_config(cfg)
    assert cfg.features_dir == "s3://bucket/rrt/features" and cfg.index.dir == "/fast/indexes"
    assert join_location(cfg.features_dir, "synthetic", "t.lance") == "s3://bucket/rrt/features/synthetic/t.lance"
    with pytest.raises(ConfigError, match="storage_root"):
        validate_config(make(["storage_root=s3://bucket/rrt/"]))
    assert join_location("s3://bucket/rrt/", "features", "/t.lance") == "s3://bucket/rrt/features/t.lance"

    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    cfg.output_dir = str(tmp_path / "outputs" / "evaluate" / "2026-11-24_08-00-00")
    assert outputs_destination(cfg, "evaluate") is None                    # a local run keeps its folder
    cfg.outputs_root = "memory://shared/out"
    assert outputs_destination(cfg, "evaluate") == "memory://shared/out/evaluate/2026-11-24_08-00-00"
    cfg.outputs_root = None
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    assert outputs_destination(cfg, "evaluate") == "s3://bucket/rrt/outputs/evaluate/2026-11-24_08-00-00"

    import fsspec

    out = Path(cfg.output_dir)
    (out / "figures").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    (out / "figures" / "curve.png").write_bytes(b"png")
    for _ in range(2):                                                     # a rerun overwrites, never nests
        publish_outputs(str(out), "memory://shared/out/evaluate/run")
    fs = fsspec.filesystem("memory")
    assert sorted(fs.find("/shared/out")) == ["/shared/out/evaluate/run/figures/curve.png",
                                              "/shared/out/evaluate/run/report.json"]
    publish_outputs(str(out), str(out))                                   # already there: nothing to copy


def test_a_failed_job_copies_its_outputs_and_reports_its_own_error(tmp_path, capsys):
    """However the job ends its outputs are copied; when the copy fails too, the job's error is the one raised
    (the copy's goes to stderr), and a job that succeeded fails when its outputs cannot be kept."""
    from rrt_dist.runtime import run_publishing_outputs

    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    cfg = OmegaConf.create({"output_dir": str(out)})
    (tmp_path / "a-file").write_text("")
    unwritable = str(tmp_path / "a-file" / "outputs")                    # under a file: cannot be made

    def broken(_):
        (out / "partial.log").write_text("epoch 3")
        raise RuntimeError("the job broke")

    with pytest.raises(RuntimeError, match="the job broke"):
        run_publishing_outputs(broken, cfg, str(tmp_path / "kept"))
    assert (tmp_path / "kept" / "partial.log").read_text() == "epoch 3"
    with pytest.raises(RuntimeError, match="the job broke"):
        run_publishing_outputs(broken, cfg, unwritable)
    assert f"outputs not copied to {unwritable}" in capsys.readouterr().err
    with pytest.raises(OSError):
        run_publishing_outputs(lambda _: "done", cfg, unwritable)
    assert run_publishing_outputs(lambda _: "done", cfg, None) == "done"
    assert run_publishing_outputs(lambda _: "done", cfg, str(tmp_path / "kept2")) == "done"
    assert (tmp_path / "kept2" / "report.json").exists()


def test_evaluation_refuses_index_options_it_would_ignore():
    """DBA in exact mode and the search job's αQE would be silently absent from the evaluation's numbers."""
    from rrt_dist.pipelines.evaluate import check_evaluation
    from rrt_dist.schema import ConfigError

    check_evaluation(make(["index=auto", "index.dba_n=2"]))         # sharded: DBA is built
    check_evaluation(make())
    with pytest.raises(ConfigError, match="index.mode=sharded"):
        check_evaluation(make(["index.dba_n=2"]))
    with pytest.raises(ConfigError, match="reranker.methods"):
        check_evaluation(make(["index.expand_queries=true"]))
    # in sharded mode the index keeps index.neighbours candidates: a deeper reranking is refused, not cut
    with pytest.raises(ConfigError, match="reranker.depth=100 > index.neighbours=20"):
        check_evaluation(make(["index.mode=sharded", "index.neighbours=20"]))
    check_evaluation(make(["index.mode=sharded", "index.neighbours=20", "reranker.depth=20"]))
    check_evaluation(make(["index.mode=sharded", "index.neighbours=20", "reranker=none"]))


@pytest.mark.parametrize("old, new", [("index.qe_n=2", "index.expand_queries=true"),
                                      ("index.qe_alpha=0.5", "reranker.aqe.alpha"),
                                      ("reranker.aqe_n=3", "reranker.aqe.n"), ("reranker.aqe_alpha=0.5", "reranker.aqe.alpha")])
def test_a_removed_key_is_refused_naming_its_replacement(old, new):
    """alpha-QE is configured once (reranker.aqe: the evaluation's aqe rows and the search job's expansion)."""
    from rrt_dist.config import validate_config
    from rrt_dist.schema import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"{old.split('=')[0]} is no longer an option: use {new}")):
        validate_config(make([old]))
    assert make().reranker.aqe.n == 2 and make().reranker.aqe.alpha == 0.3      # the paper's tuning


def test_run_names_survive_a_setting_added_at_its_old_behaviour():
    """train.warmup_steps and train.global_fusion came after runs were named: at 0 / false (training and exporting
    as before) the demo's run keeps the name its finished runs were stored under (rrt-synthetic-2afea7c6a3, the
    demo's seed-0 run before warmup existed); any warmup, or a checkpoint recording its fusion weight, is another run."""
    from rrt_dist.pipelines.train import run_name

    assert run_name(make(["experiment=demo"])) == "rrt-synthetic-2afea7c6a3"
    assert run_name(make(["experiment=demo", "train.warmup_steps=0"])) == "rrt-synthetic-2afea7c6a3"
    assert run_name(make(["experiment=demo", "train.warmup_steps=100"])) != "rrt-synthetic-2afea7c6a3"
    assert run_name(make(["experiment=demo", "train.global_fusion=true"])) != "rrt-synthetic-2afea7c6a3"


@pytest.mark.parametrize("overrides, message", [
    (["reranker.methods=[global,structural]"], "structural reads patches, which the tables of backbone"),
    (["backbone=tiny_image", "reranker.methods=[global,gv]"], "gv reads locals, positions"),
    (["backbone=tiny_image", "reranker.methods=[global,aqe+rrt]", "reranker.checkpoint=train"], "aqe+rrt reads locals"),
])
def test_a_reranker_reading_what_the_extractor_does_not_store_is_refused_at_start_up(overrides, message):
    from rrt_dist.config import validate_config
    from rrt_dist.pipelines.evaluate import check_evaluation
    from rrt_dist.schema import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_evaluation(make(overrides))
    validate_config(make(overrides))     # jobs that rerank nothing (ingest, extract, index, search) take it
    # structural reads the grids of reranker.patch_backbone when it is set (reranker=all), or of a grid backbone
    check_evaluation(make(["reranker=all"]))
    check_evaluation(make(["backbone=lite0_grid", "reranker=structural"]))


def test_every_dataset_preset_is_a_registered_dataset_of_its_schema():
    """One registry maps a dataset name to its schema, readers and capabilities (rrt_dist.datasets)."""
    from rrt_dist.config import CONFIG_DIR, validate_config
    from rrt_dist.datasets import get_dataset, list_datasets
    from rrt_dist.schema import ConfigError

    presets = {p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml")}
    assert presets == set(list_datasets())
    for name in presets - {"synthetic"}:
        validate_config(make([f"dataset={name}", "dataset.root=/data/x"]))
    assert get_dataset("folder").default_pairs == "selfsup" and get_dataset("synthetic").validation_split
    assert {n for n in presets if get_dataset(n).distractors} == {"synthetic", "roxford5k", "rparis6k"}
    assert get_dataset("msls").read_training is None
    with pytest.raises(ConfigError, match="dataset.name='foo' is not a dataset; known: cars196"):
        validate_config(make(["dataset.name=foo"]))
    with pytest.raises(ConfigError, match="needs the RevisitopConfig schema"):
        validate_config(make(["dataset=sop", "dataset.root=/x", "dataset.name=roxford5k"]))
