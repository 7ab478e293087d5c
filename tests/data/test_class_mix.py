"""A segment list sorted by label still trains on class-diverse batches under default settings.

The list below is sorted by class (as many published lists are). Real prep packs it twice: in
its default seeded order and with ``--keep-order`` (the input order, like shards written by
older versions or other tools). The real DALI CPU training loader then reads each with the
default ``data.shuffle_shards``; its batches must hold as many classes as under a full
per-epoch permutation, while a one-shard window on the input-order shards (the old failure)
must not.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cmkd_scale.config import DataConfig
from tests.fixtures.prep import prep_cli, tone, write_audio, write_segments_csv

CLASSES = 10
PER_CLASS = 12
SHARD_SIZE = 4  # 30 shards: more than one default group of 16
SR = 16000
MICRO_BATCH = 8


def _class_mids(n: int) -> list[str]:
    from cmkd_scale.demo.synth import bundled_class_labels

    rows = bundled_class_labels().read_text().splitlines()[1 : n + 1]
    return [row.split(",")[1] for row in rows]


@pytest.fixture(scope="module")
def sorted_list_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same class-sorted list packed in prep's default order and in input order."""
    root = tmp_path_factory.mktemp("class_mix")
    audio = root / "audio"
    rows = []
    for k, mid in enumerate(_class_mids(CLASSES)):
        for j in range(PER_CLASS):
            ytid = f"c{k:02d}clip{j:04d}"
            write_audio(audio / f"{ytid}.wav", tone(200.0 + 60 * k + j, 0.4, SR), SR)
            rows.append((ytid, 0.0, 0.4, [mid]))
    csv = write_segments_csv(root / "sorted_segments.csv", rows)
    out = {}
    for name, extra in (("default", ()), ("input_order", ("--keep-order",))):
        out[name] = root / name
        cmd = prep_cli(csv, audio, out[name], SHARD_SIZE, "--workers", "1", *extra)
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def _shard_classes(shards: Path) -> list[set[int]]:
    """The classes each shard holds, read from its ``.labels`` members."""
    held = []
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            labels = [
                np.frombuffer(tar.extractfile(m).read(), dtype="<f4")
                for m in tar.getmembers()
                if m.name.endswith(".labels")
            ]
        held.append({int(np.argmax(v)) for v in labels})
    return held


def _classes_per_batch(shards: Path, *, shuffle_shards: int, epochs: int = 2) -> float:
    """Mean number of distinct classes in the real loader's training batches."""
    from cmkd_scale.data.loader import TrainLoader

    cfg = DataConfig(
        train=str(shards),
        target_length=48,
        mixup=0.0,
        freqm=0,
        timem=0,
        shuffle_shards=shuffle_shards,
        num_threads=1,
        device="cpu",
    )
    loader = TrainLoader(cfg, micro_batch=MICRO_BATCH, rank=0, world_size=1, seed=0, device="cpu")
    try:
        counts = [
            len(set(batch.labels.argmax(dim=1).tolist()))
            for epoch in range(epochs)
            for batch in loader.epoch_batches(epoch)
        ]
    finally:
        loader.close()
    return float(np.mean(counts))


def test_prep_mixes_a_sorted_list_across_shards(sorted_list_shards: dict[str, Path]) -> None:
    mixed = _shard_classes(sorted_list_shards["default"])
    kept = _shard_classes(sorted_list_shards["input_order"])
    assert len(mixed) == len(kept) == CLASSES * PER_CLASS // SHARD_SIZE
    assert max(len(c) for c in kept) <= 2  # input order: a shard holds one or two classes
    assert np.mean([len(c) for c in mixed]) >= 3.0  # 4 clips of 10 classes: ~3.5 expected
    manifest = json.loads((sorted_list_shards["default"] / "manifest.json").read_text())
    assert manifest["order_seed"] is not None
    kept_manifest = json.loads((sorted_list_shards["input_order"] / "manifest.json").read_text())
    assert kept_manifest["order_seed"] is None


@pytest.mark.parametrize("packing", ["default", "input_order"])
def test_default_shuffle_is_as_class_diverse_as_a_full_permutation(
    sorted_list_shards: dict[str, Path], packing: str
) -> None:
    shards = sorted_list_shards[packing]
    default = _classes_per_batch(shards, shuffle_shards=DataConfig().shuffle_shards)
    full = _classes_per_batch(shards, shuffle_shards=0)
    assert default == pytest.approx(full, rel=0.08), (default, full)
    assert full > 5.0  # 8 draws from 10 balanced classes: ~5.7 expected


def test_one_shard_windows_on_input_order_shards_are_not(
    sorted_list_shards: dict[str, Path],
) -> None:
    """The failure the default avoids (and the measure above can see): windows of one shard."""
    one = _classes_per_batch(sorted_list_shards["input_order"], shuffle_shards=1)
    full = _classes_per_batch(sorted_list_shards["input_order"], shuffle_shards=0)
    assert one < 0.6 * full, (one, full)
