"""ImageNet weights for the timm backbones: ``model.imagenet_weights``.

- ``timm:<arch>.<tag>`` (or ``timm:<tag>``): timm's own pretrained mechanism, which reads the
  Hugging Face hub cache (``$HF_HOME/hub``, ``models--timm--<arch>.<tag>``). The recipes name
  their tag: PSLA's EfficientNet-B2 is efficientnet_pytorch's ImageNet model, timm's
  ``tf_efficientnet_b2.aa_in1k`` (timm's *default* tag for that name is the Noisy-Student JFT
  model ``ns_jft_in1k``); AST's DeiT is ``deit_base_distilled_patch16_384.fb_in1k``.
  ``python -m cmkd_scale.weights fetch --config X.yaml`` downloads them on a machine with
  internet; compute nodes then run with ``HF_HUB_OFFLINE=1``.
- a path: a local timm state dict (no download).
- ``""``: random initialisation.

A missing file is an error naming the fetch command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMM_PREFIX = "timm:"
FETCH = "python -m cmkd_scale.weights fetch --config <recipe>.yaml"


class WeightsMissingError(FileNotFoundError):
    """Pretrained weights a config names are not on this machine."""


def timm_spec(timm_name: str, spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` for ``timm.create_model`` from a ``model.imagenet_weights`` value."""
    if not spec:
        return timm_name, {}
    if spec.startswith(TIMM_PREFIX):
        tagged = spec.removeprefix(TIMM_PREFIX)
        arch, dot, tag = tagged.partition(".")
        if not dot:
            arch, tag = timm_name, tagged
        if arch != timm_name:
            raise ValueError(
                f"model.imagenet_weights={spec!r} is for {arch}, but the backbone is {timm_name}: "
                f"use timm:{timm_name}.<tag> (timm.list_pretrained('{timm_name}*') lists them)"
            )
        return f"{timm_name}.{tag}", {"pretrained": True}
    if not Path(spec).is_file():
        raise WeightsMissingError(
            f"model.imagenet_weights={spec}: no such file. Name timm's weights instead "
            f"(timm:{timm_name}.<tag>) and fetch them with `{FETCH}`"
        )
    return timm_name, {"pretrained": True, "pretrained_cfg_overlay": {"file": spec}}


@contextlib.contextmanager
def named_if_missing(spec: str, timm_name: str) -> Iterator[None]:
    """Turn timm's / the hub's file-not-found into an error naming the fetch command."""
    try:
        yield
    except FileNotFoundError as exc:
        if isinstance(exc, WeightsMissingError) or not spec:
            raise
        raise WeightsMissingError(
            f"ImageNet weights {spec} for {timm_name} are not on this machine "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Run "
            f"`{FETCH}` where the Hugging Face hub is reachable (a login node), with the same "
            "HF_HOME as the compute nodes; they then run with HF_HUB_OFFLINE=1"
        ) from exc


def create_timm(timm_name: str, spec: str, **kwargs: Any) -> Any:
    """``timm.create_model`` with ``model.imagenet_weights`` resolved (see the module doc)."""
    import timm

    name, extra = timm_spec(timm_name, spec)
    with named_if_missing(spec, timm_name):
        return timm.create_model(name, **extra, **kwargs)
