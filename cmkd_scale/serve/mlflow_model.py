"""An export as an MLflow pyfunc model: the loader module MLflow calls, no MLflow import here.

A training run logs its reported model with this module as the pyfunc's ``loader_module``
(``tracking.log_model``, registered as ``tracking.register``). Anywhere cmkd_scale is
installed::

    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model("models:/audio-tagger/1")   # or runs:/RUN/model
    model.predict(pd.DataFrame({"audio": ["clip.wav", "song.mp3"]}))  # paths, any format
    model.predict(pd.DataFrame({"audio": ["clip.wav"]}), params={"top_k": 3})
    model.predict(pd.DataFrame({"waveform": [wave]}))  # 16 kHz mono float32 samples

The result is one row per input: ``file`` (the path, or ``waveform[i]``), ``labels`` and
``probs`` (the top ``top_k`` classes, best first: the same as ``python -m cmkd_scale.infer``
on that file), ``duration_s``. Params: ``top_k`` (5), ``hop`` (window hop in frames, 0 = the
window length), ``window_pool`` (max | mean), as infer's options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmkd_scale import SAMPLE_RATE
from cmkd_scale.serve.infer import (
    Classifier,
    ModelOptions,
    features,
    load_classifier,
    predict,
    read_wave,
)


def _load_pyfunc(data_path: str) -> AudioTagger:
    """MLflow's entry point: ``data_path`` is the export file (or a folder holding one)."""
    path = Path(data_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth"))
        if len(files) != 1:
            raise ValueError(f"{path} should hold one export (.pt), found {len(files)}")
        path = files[0]
    return AudioTagger(load_classifier(ModelOptions(checkpoint=str(path), device="auto")))


class AudioTagger:
    """What ``mlflow.pyfunc.load_model(...).predict`` calls."""

    def __init__(self, clf: Classifier) -> None:
        self.clf = clf

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        params = params or {}
        top_k = int(params.get("top_k", 5))
        hop = int(params.get("hop", 0)) or self.clf.target_length
        pool = str(params.get("window_pool", "max"))
        rows = []
        for name, wave in _inputs(model_input):
            if wave is None:
                wave = read_wave(name)
            probs = predict(self.clf, features(self.clf, wave, hop), pool)
            top = np.argsort(-probs, kind="stable")[:top_k]
            rows.append(
                {
                    "file": name,
                    "labels": [self.clf.class_names[i] for i in top],
                    "probs": [float(probs[i]) for i in top],
                    "duration_s": round(len(wave) / SAMPLE_RATE, 3),
                }
            )
        return pd.DataFrame(rows, columns=["file", "labels", "probs", "duration_s"])


def _inputs(model_input: Any) -> list[tuple[str, np.ndarray | None]]:
    """(name, waveform or None for a path) per row of a DataFrame (``audio`` / ``waveform``
    columns), a list of paths or waveforms, a dict of columns, one path or one waveform."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        out: list[tuple[str, np.ndarray | None]] = []
        for i, row in enumerate(model_input.to_dict("records")):
            audio, wave = row.get("audio"), row.get("waveform")
            if isinstance(audio, str) and audio:
                out.append((audio, None))
            elif wave is not None and len(wave) > 0:
                out.append((f"waveform[{i}]", np.array(wave, dtype=np.float32)))
            else:
                raise ValueError(f"row {i}: give an 'audio' file path or a 'waveform'")
        return out
    if isinstance(model_input, (str, Path)):
        return [(str(model_input), None)]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 1:
        return [("waveform[0]", model_input.astype(np.float32))]
    out = []
    for i, item in enumerate(model_input):
        if isinstance(item, (str, Path)):
            out.append((str(item), None))
        else:
            out.append((f"waveform[{i}]", np.array(item, dtype=np.float32)))
    return out
