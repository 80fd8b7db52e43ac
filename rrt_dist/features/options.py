"""Each extractor's options: plain dataclasses (no model code), so the config schema and the registry read them
without importing torch. ``backbone.options`` of a preset follows the dataclass of its extractor."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from rrt_dist.schema import bounded

DELG_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def parse_options(config_class: type, **cfg):
    """``config_class(**cfg)`` with lists (as Hydra gives them) turned into tuples (hashable, as the fields say)."""
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def added(default, **bounds):
    """An option added after tables were written: recorded (table metadata, fingerprint) only when set to another
    value than ``default``, so that the tables of every earlier configuration keep their fingerprint."""
    return field(default=default, metadata={**bounded(default, **bounds).metadata, "recorded_when_set": True})


def recorded_options(cfg) -> dict:
    """What an extractor's options record (its fingerprint, its tables' metadata): all but ``device`` (where it runs
    changes no descriptor), an :func:`added` option only when set."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "device"
            and not (f.metadata.get("recorded_when_set") and getattr(cfg, f.name) == f.default)}


@dataclass(frozen=True)
class TinyImageConfig:
    hist_bins: tuple[int, int, int] = (8, 4, 4)   # hue, saturation, value
    thumb: tuple[int, int] = (12, 9)              # grey thumbnail (width, height)
    thumb_weight: float = 1.0


@dataclass(frozen=True)
class MultiscaleConfig:
    model: str = "resnet50"
    checkpoint: Optional[str] = None
    pretrained: bool = True
    scales: tuple = DELG_SCALES
    global_scales: tuple = (0.7071, 1.0, 1.4142)
    max_size: int = 1024
    gem_p: float = 3.0
    max_local: int = 500
    local_dim: int = 128
    nms_cell: float = 8.0                 # NMS cell side in original-image pixels (0 disables)
    whitening: Optional[str] = None       # .npz with mean [C], projection [C, d_g]
    local_projection: Optional[str] = None  # .npz with mean [C16], projection [C16, local_dim]
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    device: str = "auto"
    seed: int = 0
    # The SuperGlobal paper's pooling (Shao et al., ICCV 2023), all off by default. Its GeM+ is GeM with a larger p:
    # gem_p above (the authors use 4.6). Regional GeM: the stride-32 map averaged with its power mean of order
    # regional_gem_p (the paper: 2.5) over regional_gem_window² neighbourhoods (odd; reflection-padded), then GeM.
    regional_gem_p: Optional[float] = added(None, gt=0)
    regional_gem_window: int = added(5, ge=1)
    # Scale-GeM: the global scales' L2-normalised GeM vectors aggregated by a generalised mean of order scale_gem_p
    # (shifted by their minimum, as the paper's), inf: their element-wise max (the authors' default); None: their
    # normalised sum (DELG's).
    scale_gem_p: Optional[float] = added(None, gt=0)


@dataclass(frozen=True)
class DenseGridConfig:
    model: str = "resnet50"
    checkpoint: Optional[str] = None
    pretrained: bool = True
    image_size: int = 224
    resize: Optional[int] = None              # shorter side -> resize, then centre crop image_size (None: squash)
    dim: int = 128
    global_projection: Optional[str] = None   # .npz mean/projection [C, dim]; default: fixed orthogonal
    local_projection: Optional[str] = None
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class ViTConfig:
    model: str = "deit-s"                     # deit-s | swin-t | cvt-13 (or any timm ViT name)
    checkpoint: Optional[str] = None
    pretrained: bool = True
    image_size: int = 224
    resize: Optional[int] = None              # shorter side -> resize, then centre crop image_size (None: squash)
    grid_size: Optional[int] = 7              # patch grid average-pooled to grid_size x grid_size (None: native)
    dim: Optional[int] = None                 # project global and tokens to dim (None: the model's width, as is)
    global_projection: Optional[str] = None   # .npz mean/projection [width, dim]; default: fixed orthogonal
    local_projection: Optional[str] = None
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class DelgReleaseConfig:
    """Released DELG descriptor files (the RRT paper's), read instead of extracted: ``release`` names the descriptor
    version (the files' folder is ``delg_<release>``), so two releases never share a table."""
    release: str = "r50_gldv2"                # r50_gldv1 | r50_gldv2 | r101_gldv1 | r101_gldv2 (or your own)
    global_dim: int = 2048
    max_local: int = 500                      # locals kept per image, by decreasing attention
    scale_mapping: str = "released"           # released: the released checkpoints' bucketing | exact
