"""Each extractor's options: plain dataclasses (no model code), so the config schema and the registry read them
without importing torch. ``backbone.options`` of a preset follows the dataclass of its extractor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DELG_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def parse_options(config_class: type, **cfg):
    """``config_class(**cfg)`` with lists (as Hydra gives them) turned into tuples (hashable, as the fields say)."""
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


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
