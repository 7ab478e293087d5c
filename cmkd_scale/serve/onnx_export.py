"""Export a classifier to ONNX and check that ONNX Runtime reproduces its outputs.

    python -m cmkd_scale.export --checkpoint runs/x/models/best.pt --out student.onnx
    python -m cmkd_scale.export --checkpoint audioset_10_10_0.4593.pth --arch ast --out ast.onnx

ONNX rather than TorchScript: ``torch.jit`` is deprecated in this torch and ONNX runs without
torch (ONNX Runtime, TensorRT).  The graph comes from ``torch.onnx.export(dynamo=True)``; input
``fbank`` is the normalised feature ``[batch, target_length, mel bins]`` (dynamic batch, as
``python -m cmkd_scale.infer`` makes it), output ``logits`` ``[batch, classes]``.

The check: a batch of a different size than the one traced runs through both the torch model
and ONNX Runtime; the largest absolute difference must stay under ``--atol``, otherwise the
file is not written.  ``OUT.json`` beside the model records the feature settings, class names
and the measured difference.  The file is written under a temporary name and renamed when the
check passes, so a failed export leaves no half-written model behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd_scale.logs import setup_logging
from cmkd_scale.serve.infer import Classifier, ModelOptions, add_model_arguments, load_classifier

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported graph does not reproduce the model."""


@dataclass(kw_only=True)
class ExportOptions:
    """What ``python -m cmkd_scale.export`` does: which model, where to, how strict a check."""

    model: ModelOptions  # its device is ignored: the check runs on the CPU
    out: Path  # the .onnx file to write (``out.json`` beside it)
    atol: float = 1e-4  # largest allowed |onnx - torch| on the check batch
    opset: int = 18


def example_batch(clf: Classifier, batch: int, seed: int) -> torch.Tensor:
    """A random normalised-fbank-like batch of the model's input shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, clf.target_length, clf.num_mel_bins, generator=gen)


def onnx_max_abs_diff(path: Path, model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest |ONNX Runtime - torch| over the logits of ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"fbank": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} != torch {expected.shape}")
    return float(np.abs(got - expected).max())


def export_onnx(clf: Classifier, out: Path, *, atol: float = 1e-4, opset: int = 18) -> dict:
    """Write ``out`` and ``out.json`` once ONNX Runtime matches torch; returns the info."""
    model = clf.model.to("cpu").eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout is ours
        torch.onnx.export(
            model,
            (example_batch(clf, 2, seed=0),),
            str(partial),
            input_names=["fbank"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            external_data=False,
            dynamo=True,
        )
    seconds = time.perf_counter() - start
    try:
        diff = onnx_max_abs_diff(partial, model, example_batch(clf, 3, seed=1))
        if not diff <= atol:
            raise ExportError(
                f"ONNX Runtime differs from torch by {diff:.3g} > --atol {atol:g}; "
                f"{out} was not written"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    info: dict[str, Any] = {
        "format": "onnx",
        "input": {"name": "fbank", "shape": ["batch", clf.target_length, clf.num_mel_bins]},
        "output": {"name": "logits", "shape": ["batch", len(clf.class_names)]},
        "activation": clf.activation,
        "features": {
            "fbank": "torchaudio.compliance.kaldi.fbank(htk_compat, hanning, 25 ms/10 ms)",
            "num_mel_bins": clf.num_mel_bins,
            "target_length": clf.target_length,
            "norm_mean": clf.norm_mean,
            "norm_std": clf.norm_std,
            "normalisation": "(fbank - norm_mean) / (2 * norm_std)",
        },
        "class_names": clf.class_names,
        "check": {"batch": 3, "max_abs_diff": diff, "atol": atol},
        "arch": getattr(model, "arch_name", type(model).__name__),
        "export_seconds": round(seconds, 1),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=2))
    log.info("exported %s (max |onnx - torch| = %.2g, %.0f s)", out, diff, seconds)
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cmkd_scale.export", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnx - torch|")
    p.add_argument("--opset", type=int, default=18)
    add_model_arguments(p)
    return p


def run(opts: ExportOptions) -> int:
    """Export and check; 2 (with the reason on stderr) when the model or the check fails."""
    from cmkd_scale.models import CheckpointError

    try:
        clf = load_classifier(dataclasses.replace(opts.model, device="cpu"))
        info = export_onnx(clf, opts.out, atol=opts.atol, opset=opts.opset)
    except (ValueError, CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(opts.out), **info["check"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cmkd_scale.export``: parse the command line into ``ExportOptions``, run."""
    args = _parser().parse_args(argv)
    setup_logging()
    opts = ExportOptions(
        model=ModelOptions.from_args(args), out=args.out, atol=args.atol, opset=args.opset
    )
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
