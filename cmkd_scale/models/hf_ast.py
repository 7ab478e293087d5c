"""Hugging Face transformers AST checkpoints (``ASTForAudioClassification``) as our AST.

A checkpoint is a folder with ``config.json`` (``model_type: audio-spectrogram-transformer``)
and ``model.safetensors`` or ``pytorch_model.bin`` (``save_pretrained``'s output), or a hub id
written ``hf:<owner>/<name>`` (e.g. ``hf:MIT/ast-finetuned-audioset-10-10-0.4593``), read from
the Hugging Face cache (``python -m cmkd_scale.weights fetch`` downloads it; compute nodes run
with ``HF_HUB_OFFLINE=1``).

:func:`hf_export` turns one into an in-memory :class:`Export`: our AST with the checkpoint's
width, depth, heads, strides and LayerNorm epsilon, its classes (``id2label``), and its own
feature settings — frames and mel bins from ``config.json`` (``max_length``, ``num_mel_bins``),
normalisation from ``preprocessor_config.json`` (``ASTFeatureExtractor``'s ``mean``/``std``,
applied as ``(x - mean) / (2 std)`` like AST's). Everything that reads an export — the teacher,
``evaluate``, ``infer`` — then reads these too.

Names: the hub files use transformers 4's names (``encoder.layer.N.attention.attention.query``,
``intermediate.dense`` ...), which ``save_pretrained`` still writes; transformers 5's in-memory
names (``layers.N.attention.q_proj``, ``mlp.fc1`` ...) are accepted as well. The separate q/k/v
projections become timm's fused ``qkv``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from cmkd_scale.config import Config, DataConfig
from cmkd_scale.models.pretrained import FETCH, WeightsMissingError

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
MODEL_TYPE = "audio-spectrogram-transformer"
# what a checkpoint folder needs (and what `weights fetch` downloads)
HF_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
_BASE = "audio_spectrogram_transformer."


def is_hf_ast(spec: str | Path) -> bool:
    """True for ``hf:<id>`` or a local folder holding a transformers AST ``config.json``."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        return True
    config = Path(text) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def hf_folder(spec: str | Path, *, download: bool = False) -> Path:
    """The local folder of ``spec``: itself, or the hub snapshot in the Hugging Face cache."""
    text = str(spec)
    if not text.startswith(HF_PREFIX):
        return Path(text)
    from huggingface_hub import snapshot_download

    repo = text.removeprefix(HF_PREFIX)
    try:
        folder = snapshot_download(repo, allow_patterns=HF_FILES, local_files_only=not download)
    except Exception as exc:  # the hub's "not cached" / offline / not found errors
        raise WeightsMissingError(
            f"Hugging Face checkpoint {text} is not in this machine's cache ({type(exc).__name__}"
            f"). Run `{FETCH}` where the hub is reachable, with the same HF_HOME; compute nodes "
            "then run with HF_HUB_OFFLINE=1"
        ) from exc
    return Path(folder)


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    safe = folder / "model.safetensors"
    if safe.is_file():
        from safetensors.torch import load_file

        return load_file(str(safe), device="cpu")
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise WeightsMissingError(
        f"{folder} has config.json but no model.safetensors or pytorch_model.bin: save it with "
        f"save_pretrained, or fetch it (`{FETCH}`)"
    )


_V4 = {  # transformers 4 (the hub files) -> timm block member
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_V5 = {  # transformers 5 in-memory names
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_TOP = {
    "embeddings.cls_token": "v.cls_token",
    "embeddings.distillation_token": "v.dist_token",
    "embeddings.position_embeddings": "v.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "v.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "v.patch_embed.proj.bias",
    "layernorm.weight": "v.norm.weight",
    "layernorm.bias": "v.norm.bias",
}
_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def map_hf_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers AST state dict in our AST's names (q/k/v fused into timm's qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("classifier."):
            leaf = key.removeprefix("classifier.")
            mapped = {"layernorm": "mlp_head.0", "dense": "mlp_head.1"}.get(leaf.rsplit(".", 1)[0])
            if mapped:
                out[f"{mapped}.{leaf.rsplit('.', 1)[1]}"] = value
                continue
        body = key.removeprefix(_BASE)
        if body in _TOP:
            out[_TOP[body]] = value
            continue
        match = _LAYER.fullmatch(body)
        member = match and (_V4.get(match.group(2)) or _V5.get(match.group(2)))
        if not member:
            unknown.append(key)
            continue
        index, leaf = int(match.group(1)), match.group(3)
        if member in ("q", "k", "v"):
            qkv.setdefault((index, leaf), {})[member] = value
        else:
            out[f"v.blocks.{index}.{member}.{leaf}"] = value
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) of the transformers AST layout have no place in "
            f"our AST: {unknown[:8]}"
        )
    for (index, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: layer {index} lacks part of its query/key/value {leaf}")
        out[f"v.blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def hf_settings(folder: Path) -> tuple[dict[str, Any], DataConfig]:
    """``config.json`` and the input settings its model was trained on."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"{folder}/config.json is a {config.get('model_type')!r} model, not an AST "
            f"({MODEL_TYPE!r})"
        )
    defaults = DataConfig()
    mean, std = defaults.norm_mean, defaults.norm_std  # ASTFeatureExtractor's own defaults
    extractor = folder / "preprocessor_config.json"
    if extractor.is_file():
        pre = json.loads(extractor.read_text())
        if pre.get("do_normalize", True):
            mean, std = float(pre.get("mean", mean)), float(pre.get("std", std))
        else:
            mean, std = 0.0, 0.5  # (x - 0) / (2 * 0.5) = x: no normalisation
    else:
        log.warning(
            "%s has no preprocessor_config.json: ASTFeatureExtractor's default normalisation "
            "(mean %g, std %g) assumed",
            folder,
            mean,
            std,
        )
    data = DataConfig(
        target_length=int(config.get("max_length", 1024)),
        num_mel_bins=int(config.get("num_mel_bins", 128)),
        norm_mean=mean,
        norm_std=std,
    )
    return config, data


def hf_export(spec: str | Path) -> Any:
    """The transformers AST checkpoint ``spec`` as an in-memory :class:`Export`."""
    from cmkd_scale.models.exported import Export

    folder = hf_folder(spec)
    config, data = hf_settings(folder)
    hidden = int(config.get("hidden_size", 768))
    if int(config.get("intermediate_size", 4 * hidden)) != 4 * hidden:
        raise ValueError(f"{spec}: intermediate_size != 4 x hidden_size has no timm DeiT twin")
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise ValueError(f"{spec}: only gelu activations with qkv biases map onto our AST")
    labels = config.get("id2label") or {}
    num_classes = int(config.get("num_labels") or len(labels))
    names = [labels.get(str(i), labels.get(i, f"class {i}")) for i in range(num_classes)]
    cfg = Config()
    cfg.data = data
    cfg.model.arch = "ast"
    cfg.model.name = "deit_base_distilled_patch16_384"  # DeiT-distilled: CLS + distillation token
    cfg.model.embed_dim = hidden
    cfg.model.depth = int(config.get("num_hidden_layers", 12))
    cfg.model.num_heads = int(config.get("num_attention_heads", 12))
    cfg.model.fstride = int(config.get("frequency_stride", 10))
    cfg.model.tstride = int(config.get("time_stride", 10))
    cfg.model.layer_norm_eps = float(config.get("layer_norm_eps", 1e-12))
    cfg.model.imagenet_weights = ""
    cfg.model.checkpoint = str(spec)
    if int(config.get("patch_size", 16)) != 16:
        raise ValueError(f"{spec}: patch_size {config.get('patch_size')} (our AST uses 16)")
    state = map_hf_state(_read_state(folder), str(spec))
    log.info("Hugging Face AST %s: %d classes, input %s", spec, num_classes, data)
    return Export(
        state_dict=state,
        config=cfg.to_dict(),
        num_classes=num_classes,
        class_names=names,
        source_checkpoint=str(spec),
    )


def read_export(path: str | Path) -> Any:
    """An export file, or a transformers AST checkpoint (folder / ``hf:<id>``) as one."""
    from cmkd_scale.models.exported import Export

    return hf_export(path) if is_hf_ast(path) else Export.load(path)
