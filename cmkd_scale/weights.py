"""Download the pretrained weights a recipe needs, before compute nodes run offline.

    python -m cmkd_scale.weights fetch --config configs/audioset_full_cnn2ast.yaml [key=value ...]

Run it on a machine that reaches the Hugging Face hub (a login node), with the HF_HOME the
compute nodes will use; they then run with ``HF_HUB_OFFLINE=1`` and read everything from that
cache. It fetches ``model.imagenet_weights: timm:<arch>.<tag>`` through timm's own pretrained
mechanism (the files timm reads when it builds the model) and Hugging Face AST checkpoints named
``hf:<owner>/<name>`` in ``model.checkpoint`` / ``teacher.checkpoint`` (config.json,
preprocessor_config.json and the weights). Local files are only checked. Exit status 1 when
anything is missing afterwards, naming it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cmkd_scale.config import Config, ModelConfig, load_config
from cmkd_scale.models.pretrained import TIMM_PREFIX, timm_spec


@dataclass(frozen=True)
class Need:
    key: str  # the config key that names it
    kind: str  # timm | hf | file
    spec: str


def backbone_name(model: ModelConfig) -> str:
    """The timm model name the backbone is built from."""
    if model.arch == "efficientnet":
        from cmkd_scale.models.cnn import efficientnet_variant

        return f"tf_efficientnet_b{efficientnet_variant(model.name)}"
    return model.name


def needs(cfg: Config) -> list[Need]:
    """Everything a run of ``cfg`` loads from outside the run dir."""
    from cmkd_scale.models.hf_ast import HF_PREFIX

    out: list[Need] = []
    if cfg.model.imagenet_weights.startswith(TIMM_PREFIX):
        out.append(Need("model.imagenet_weights", "timm", cfg.model.imagenet_weights))
    elif cfg.model.imagenet_weights:
        out.append(Need("model.imagenet_weights", "file", cfg.model.imagenet_weights))
    for key, spec in (
        ("model.checkpoint", cfg.model.checkpoint),
        ("teacher.checkpoint", cfg.teacher.checkpoint if cfg.teacher.arch != "none" else ""),
    ):
        if spec.startswith(HF_PREFIX):
            out.append(Need(key, "hf", spec))
        elif spec:
            out.append(Need(key, "file", spec))
    return out


def _fetch_timm(cfg: Config, need: Need) -> str:
    import timm

    name, _ = timm_spec(backbone_name(cfg.model), need.spec)
    timm.create_model(name, pretrained=True)  # timm's own download into the hub cache
    return f"{name}: in the cache"


def _fetch_hf(need: Need, *, download: bool) -> str:
    from cmkd_scale.models.hf_ast import hf_folder, hf_settings

    folder = hf_folder(need.spec, download=download)
    hf_settings(folder)  # a readable AST config
    return f"{need.spec}: {folder}"


def fetch(cfg: Config) -> int:
    """Download (or find cached) every need of ``cfg``; print one line each; 0 when all there."""
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    missing = 0
    for need in needs(cfg):
        try:
            if need.kind == "timm":
                line = _fetch_timm(cfg, need)
            elif need.kind == "hf":
                line = _fetch_hf(need, download=not offline)
            elif os.path.exists(need.spec):
                line = f"{need.spec}: local file, present"
            else:
                line = f"{need.spec}: local file, absent (a run of another recipe writes it?)"
                if need.key == "model.imagenet_weights":
                    missing += 1
            print(f"ok      {need.key}: {line}")
        except Exception as exc:  # report each, go on with the rest
            missing += 1
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"MISSING {need.key}={need.spec}: {first}")
    print(
        f"cache: {constants.HF_HUB_CACHE}"
        + (" (HF_HUB_OFFLINE=1: nothing was downloaded)" if offline else "")
    )
    if missing:
        print(f"{missing} missing: run this where the Hugging Face hub is reachable")
        return 1
    print("compute nodes: export HF_HOME=" + constants.HF_HOME + " HF_HUB_OFFLINE=1")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.weights", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download what a recipe needs into the Hugging Face cache")
    f.add_argument("--config", required=True, help="the recipe (configs/*.yaml)")
    f.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    return fetch(load_config(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
