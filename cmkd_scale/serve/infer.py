"""Tag audio files with a trained classifier: top-k labels with probabilities.

    python -m cmkd_scale.infer --checkpoint runs/x/models/best.pt clip.wav song.m4a [--json]
    python -m cmkd_scale.infer --checkpoint audioset_10_10_0.4593.pth --arch ast \\
        --model-name deit_base_distilled_patch16_384 clip.flac

Checkpoints: our exports (``{"model", "config", "num_classes", "class_names"}``: the model,
feature settings and class names come from the export) or released AST / PSLA / CMKD files
(then ``--arch`` and ``--model-name`` say which network; the class count is read from the
classifier weights, AudioSet's 527 names are bundled, ``--class-labels`` gives others).

Features are the reference ones (AST's dataloader): decode any format prep reads and make it
16 kHz mono (``cmkd_scale.prep.audio_io``), remove the mean, ``torchaudio.compliance.kaldi.fbank``
(``cmkd_scale.data.reference.kaldi_fbank``), normalise with ``(x - mean) / (2 * std)``.

Long files: the fbank is cut into windows of ``target_length`` frames every ``--hop`` frames
(default: ``target_length``, no overlap); the last window ends at the file's end, so every
window is full.  A file shorter than one window is zero-padded like AST's training clips.
Window probabilities are pooled per class by ``max`` (default: a sound counts when any window
holds it, as an AudioSet label does for a clip) or ``mean``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale import SAMPLE_RATE
from cmkd_scale.config import DataConfig, ModelConfig
from cmkd_scale.logs import setup_logging
from cmkd_scale.models.exported import Export

log = logging.getLogger(__name__)

BUNDLED_AUDIOSET = Path(__file__).resolve().parents[1] / "resources" / "class_labels_indices.csv"
_DATA = DataConfig()


@dataclass
class Classifier:
    """A model in eval mode with the feature settings and class names it was trained with."""

    model: torch.nn.Module
    class_names: list[str]
    target_length: int
    num_mel_bins: int
    norm_mean: float
    norm_std: float
    activation: str  # sigmoid (multi-label) or softmax (single-label)
    device: torch.device


@dataclass(kw_only=True)
class ModelOptions:
    """Which checkpoint to load, and how: our export describes itself; a released AST / PSLA /
    CMKD file needs ``arch`` (and ``model_name``), the rest have the released models' defaults."""

    checkpoint: str
    activation: str | None = None  # sigmoid | softmax (default: from the export's loss)
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    class_labels: str | None = None  # class_labels_indices.csv with the class names
    arch: str | None = None  # released checkpoints: ast | efficientnet | timm
    model_name: str | None = None
    num_classes: int = 0  # 0: read from the classifier weights
    target_length: int = 0  # frames (0: DataConfig's default)
    norm_mean: float | None = None
    norm_std: float | None = None
    pooling: str = "attention"
    attention_heads: int = 4
    cla_activation: str = "linear"  # sigmoid for PSLA's released CNNs, linear for CMKD's
    fstride: int = 10
    tstride: int = 10

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        """The options ``add_model_arguments`` parsed."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass(kw_only=True)
class InferOptions:
    """What ``python -m cmkd_scale.infer`` does: files, model, output."""

    audio: list[str]
    model: ModelOptions
    top_k: int = 5
    json: bool = False  # one JSON document instead of text
    hop: int = 0  # window hop in frames (0: the window length)
    window_pool: str = "max"  # max | mean over a file's windows


def audioset_names(path: Path = BUNDLED_AUDIOSET) -> list[str]:
    """Display names from a ``class_labels_indices.csv`` (index,mid,display_name)."""
    from cmkd_scale.prep.segments import read_class_index

    return [c.display_name for c in read_class_index(path).classes]


def classifier_width(state: dict[str, torch.Tensor]) -> int | None:
    """The class count of a released AST / PSLA / CMKD state dict, from its classifier."""
    for key in ("mlp_head.1.weight", "attention.cla.0.weight", "attention.cla.weight"):
        for candidate in (key, f"module.{key}"):
            if candidate in state:
                return int(state[candidate].shape[0])
    return None


def _class_names(num_classes: int, labels_csv: str | None) -> list[str]:
    """Names from ``--class-labels``, else AudioSet's bundled index for 527 classes."""
    if labels_csv:
        names = audioset_names(Path(labels_csv))
        if len(names) != num_classes:
            raise ValueError(
                f"--class-labels {labels_csv} lists {len(names)} classes, the model has "
                f"{num_classes}: pass the index the model was trained with"
            )
        return names
    names = audioset_names()
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


DEFAULT_NAMES = {"ast": "deit_base_distilled_patch16_384", "efficientnet": "efficientnet_b2"}


def load_classifier(opts: ModelOptions) -> Classifier:
    """Build the model for ``opts.checkpoint`` (our export, or a released file + ``arch``)."""
    from cmkd_scale.models import build_model, load_checkpoint_object, read_checkpoint
    from cmkd_scale.models.load import strip_module_prefix, unwrap

    device = torch.device(
        opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    from cmkd_scale.models.hf_ast import hf_export, is_hf_ast

    if is_hf_ast(opts.checkpoint):  # a transformers AST folder / hf:<id>, with its settings
        raw = hf_export(opts.checkpoint).payload()
    else:
        raw = read_checkpoint(opts.checkpoint)
    if Export.looks_like(raw):
        export = Export.from_payload(raw, source=opts.checkpoint)
        cfg = export.cfg
        data = cfg.data
        num_classes = export.num_classes or classifier_width(export.state_dict) or 0
        names = export.class_names or _class_names(num_classes, opts.class_labels)
        model_cfg = dataclasses.replace(cfg.model, imagenet_weights="")  # the export has all
        activation = opts.activation or (
            "softmax" if cfg.distill.loss in ("ce", "kl") else "sigmoid"
        )
    else:
        if not opts.arch:
            raise ValueError(
                f"{opts.checkpoint} is not a cmkd_scale export: say which network it holds with "
                "--arch ast|efficientnet|timm and --model-name (e.g. "
                "deit_base_distilled_patch16_384 for AST, efficientnet_b2 for PSLA/CMKD CNNs)"
            )
        model_name = opts.model_name or DEFAULT_NAMES.get(opts.arch)
        if not model_name:
            raise ValueError("--arch timm needs --model-name (the timm model's name)")
        state, _ = unwrap(raw, opts.checkpoint)
        num_classes = opts.num_classes or classifier_width(strip_module_prefix(state)) or 0
        if not num_classes:
            raise ValueError(
                f"cannot tell the class count of {opts.checkpoint}: pass --num-classes"
            )
        names = _class_names(num_classes, opts.class_labels)
        data = DataConfig(
            target_length=opts.target_length or _DATA.target_length,
            norm_mean=_DATA.norm_mean if opts.norm_mean is None else opts.norm_mean,
            norm_std=_DATA.norm_std if opts.norm_std is None else opts.norm_std,
        )
        model_cfg = ModelConfig(
            arch=opts.arch,
            name=model_name,
            pooling=opts.pooling,
            attention_heads=opts.attention_heads,
            cla_activation=opts.cla_activation,
            fstride=opts.fstride,
            tstride=opts.tstride,
        )
        activation = opts.activation or "sigmoid"
    model = build_model(
        model_cfg,
        num_classes=num_classes,
        input_tdim=data.target_length,
        input_fdim=data.num_mel_bins,
    )
    load_checkpoint_object(model, raw, source=opts.checkpoint, strict=True)
    return Classifier(
        model=model.to(device).eval(),
        class_names=names,
        target_length=data.target_length,
        num_mel_bins=data.num_mel_bins,
        norm_mean=data.norm_mean,
        norm_std=data.norm_std,
        activation=activation,
        device=device,
    )


def read_wave(path: str) -> np.ndarray:
    """Any audio file prep reads, as 16 kHz mono float32."""
    from cmkd_scale.prep.audio_io import decode_segment, to_mono_16k

    audio, sr = decode_segment(path, 0.0, math.inf)
    return to_mono_16k(audio, sr)


def window_starts(frames: int, length: int, hop: int) -> list[int]:
    """Start frames of full windows covering ``frames`` (one window when it is shorter)."""
    if frames <= length:
        return [0]
    starts = list(range(0, frames - length, hop))
    return [*starts, frames - length]


def features(clf: Classifier, wave: np.ndarray, hop: int) -> torch.Tensor:
    """Normalised fbank windows [W, target_length, mel bins] of one wave."""
    from cmkd_scale.data.reference import kaldi_fbank, pad_or_crop

    signal = torch.from_numpy(wave)
    fbank = kaldi_fbank(signal - signal.mean(), clf.num_mel_bins)
    windows = [
        pad_or_crop(fbank[start : start + clf.target_length], clf.target_length)
        for start in window_starts(fbank.shape[0], clf.target_length, hop)
    ]
    return (torch.stack(windows) - clf.norm_mean) / (clf.norm_std * 2)


@torch.no_grad()
def predict(clf: Classifier, windows: torch.Tensor, pool: str, batch: int = 8) -> np.ndarray:
    """Per-class probabilities of one file, pooled over its windows."""
    probs = []
    for chunk in windows.split(batch):
        logits = clf.model(chunk.to(clf.device)).float()
        probs.append(
            torch.softmax(logits, dim=1) if clf.activation == "softmax" else torch.sigmoid(logits)
        )
    stacked = torch.cat(probs)
    pooled = stacked.max(dim=0).values if pool == "max" else stacked.mean(dim=0)
    return pooled.cpu().numpy()


def tag_file(clf: Classifier, path: str, *, top_k: int, hop: int, pool: str) -> dict[str, Any]:
    """Top-k labels of one file, as a JSON-ready dict."""
    wave = read_wave(path)
    windows = features(clf, wave, hop)
    probs = predict(clf, windows, pool)
    top = np.argsort(-probs, kind="stable")[:top_k]
    return {
        "file": path,
        "duration_s": round(len(wave) / SAMPLE_RATE, 3),
        "windows": int(windows.shape[0]),
        "top": [
            {"index": int(i), "label": clf.class_names[i], "prob": round(float(probs[i]), 6)}
            for i in top
        ],
    }


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint and the flags that describe a released (non-export) checkpoint."""
    p.add_argument("--checkpoint", required=True, help="our export or an AST/PSLA/CMKD file")
    p.add_argument("--activation", choices=("sigmoid", "softmax"), default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--class-labels", default=None, help="class_labels_indices.csv for names")
    released = p.add_argument_group("released checkpoints (not our exports)")
    released.add_argument("--arch", choices=("ast", "efficientnet", "timm"), default=None)
    released.add_argument("--model-name", default=None, help="timm name, e.g. efficientnet_b2")
    released.add_argument("--num-classes", type=int, default=0)
    released.add_argument("--target-length", type=int, default=0, help="frames (AST: 1024)")
    released.add_argument("--norm-mean", type=float, default=None)
    released.add_argument("--norm-std", type=float, default=None)
    released.add_argument("--pooling", choices=("attention", "mean"), default="attention")
    released.add_argument("--attention-heads", type=int, default=4)
    released.add_argument(
        "--cla-activation",
        choices=("linear", "sigmoid"),
        default="linear",
        help="sigmoid for PSLA's released CNNs, linear for CMKD's",
    )
    released.add_argument("--fstride", type=int, default=10)
    released.add_argument("--tstride", type=int, default=10)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.infer", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, mp3, ogg, opus, m4a, ...)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--hop", type=int, default=0, help="window hop in frames (0 = window length)")
    p.add_argument("--window-pool", choices=("max", "mean"), default="max")
    add_model_arguments(p)
    return p


def _print_text(result: dict[str, Any]) -> None:
    print(f"{result['file']}  ({result['duration_s']:.2f} s, {result['windows']} window(s))")
    for item in result["top"]:
        print(f"  {item['prob']:.4f}  {item['label']}")


def run(opts: InferOptions) -> int:
    """Tag every file (one bad file costs only its own result); 1 when any failed."""
    from cmkd_scale.models import CheckpointError

    try:
        clf = load_classifier(opts.model)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hop = opts.hop or clf.target_length
    results, failed = [], 0
    start = time.perf_counter()
    for n, path in enumerate(opts.audio, 1):
        try:
            result = tag_file(clf, path, top_k=opts.top_k, hop=hop, pool=opts.window_pool)
        except Exception as exc:  # one bad file must not lose the others' results
            failed += 1
            log.error("%s: %s", path, exc)
            result = {"file": path, "error": f"{type(exc).__name__}: {exc}"}
        results.append(result)
        if not opts.json and "error" not in result:
            _print_text(result)
        elapsed = time.perf_counter() - start
        log.info("%d/%d files, %.2f files/s", n, len(opts.audio), n / max(elapsed, 1e-9))
    if opts.json:
        json.dump({"checkpoint": opts.model.checkpoint, "results": results}, sys.stdout, indent=2)
        print()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cmkd_scale.infer``: parse the command line into ``InferOptions``, run."""
    args = _parser().parse_args(argv)
    setup_logging()
    opts = InferOptions(
        audio=args.audio,
        model=ModelOptions.from_args(args),
        top_k=args.top_k,
        json=args.json,
        hop=args.hop,
        window_pool=args.window_pool,
    )
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
