"""The written order: a seeded permutation (every shard mixes classes), --keep-order, and
byte-identity across workers and array tasks with it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep import PlanError, PrepConfig, finalize, run_prep
from cmkd_scale.prep.plan import written_order
from tests.fixtures.prep import (
    CAR,
    DOG,
    MUSIC,
    SPEECH,
    tone,
    tree_digest,
    write_audio,
    write_segments_csv,
)

CLASSES = [SPEECH, MUSIC, DOG, CAR]
PER_CLASS = 5
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def sorted_list(tmp_path_factory) -> tuple[Path, Path]:
    """An AudioSet segment CSV sorted by label (as lists grouped per class come), 5 per class;
    one clip has no audio."""
    root = tmp_path_factory.mktemp("sorted")
    rows = []
    for c, mid in enumerate(CLASSES):
        for i in range(PER_CLASS):
            ytid = f"c{c}clip{i:05d}"
            rows.append((ytid, 0.0, 1.0, [mid]))
            if (c, i) != (3, 4):
                write_audio(root / "audio" / f"{ytid}.wav", tone(300 + 50 * c, 0.5, 16000), 16000)
    return write_segments_csv(root / "segments.csv", rows), root / "audio"


def config(sorted_list, out: Path, **options) -> PrepConfig:
    csv_path, audio = sorted_list
    return PrepConfig(
        segments=[csv_path], class_labels=bundled_class_labels(), audio_dir=audio, out=str(out),
        shard_size=SHARD_SIZE, **options,
    )  # fmt: skip


def shard_contents(out: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per shard, its (key, labels) in tar order, from the per-shard records."""
    manifest = json.loads((out / "manifest.json").read_text())
    contents = []
    for shard in manifest["shards"]:
        meta = json.loads((out / shard["name"].replace(".tar", ".meta.json")).read_text())
        contents.append([(key, tuple(labels)) for key, labels in meta["samples"]])
    return contents


@pytest.fixture(scope="module")
def permuted(sorted_list, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("permuted") / "out"
    run_prep(config(sorted_list, out))
    return out


def test_every_shard_of_a_label_sorted_list_mixes_classes(permuted: Path) -> None:
    shards = shard_contents(permuted)
    assert len(shards) == PER_CLASS * len(CLASSES) // SHARD_SIZE
    for shard in shards:
        assert len({labels for _, labels in shard}) >= 2, shard
    keys = [k for shard in shards for k, _ in shard]
    assert len(keys) == 19 and keys != sorted(keys)
    manifest = json.loads((permuted / "manifest.json").read_text())
    assert manifest["order_seed"] == 0 and manifest["settings"]["order_seed"] == 0
    plan = json.loads((permuted / "plan.json").read_text())
    assert plan["settings"]["order_seed"] == 0


def test_missing_and_failed_stay_in_input_order(sorted_list, tmp_path: Path) -> None:
    _, audio = sorted_list
    copy = tmp_path / "audio"
    copy.mkdir()
    for p in audio.iterdir():
        (copy / p.name).symlink_to(p)
    for name in ("c0clip00003", "c2clip00001", "c1clip00002"):  # undecodable
        (copy / f"{name}.wav").unlink()
        (copy / f"{name}.wav").write_bytes(b"RIFF not a wav")
    (copy / "c0clip00001.wav").unlink()  # missing, like c3clip00004
    out = tmp_path / "out"
    run_prep(PrepConfig(**{**config(sorted_list, out).__dict__, "audio_dir": copy}))
    with open(out / "failed.csv", newline="") as f:
        failed = [(r["ytid"], r["line"]) for r in csv.DictReader(f)]
    with open(out / "missing.csv", newline="") as f:
        missing = [(r["ytid"], r["line"]) for r in csv.DictReader(f)]
    assert failed == [("c0clip00003", "7"), ("c1clip00002", "11"), ("c2clip00001", "15")]
    assert missing == [("c0clip00001", "5"), ("c3clip00004", "23")]


def test_keep_order_writes_in_input_order(sorted_list, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = run_prep(config(sorted_list, out, keep_order=True))
    keys = [k for shard in shard_contents(out) for k, _ in shard]
    assert keys == sorted(keys)  # the CSV lists c0clip00000, c0clip00001, ...
    assert manifest["order_seed"] is None
    assert len({labels for _, labels in shard_contents(out)[0]}) == 1  # one class alone


def test_two_workers_and_array_tasks_give_the_same_bytes(
    sorted_list, permuted: Path, tmp_path: Path
) -> None:
    run_prep(config(sorted_list, tmp_path / "w2", workers=2))
    assert tree_digest(tmp_path / "w2") == tree_digest(permuted)
    for task in (1, 0):
        run_prep(config(sorted_list, tmp_path / "tasks", num_tasks=2, task_id=task))
    finalize(str(tmp_path / "tasks"))
    assert tree_digest(tmp_path / "tasks") == tree_digest(permuted)


def test_another_seed_is_another_order_and_cannot_mix_with_this_one(
    sorted_list, permuted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_prep(config(sorted_list, out, order_seed=7))
    assert shard_contents(out) != shard_contents(permuted)
    with pytest.raises(PlanError, match="new --out"):
        run_prep(config(sorted_list, out, order_seed=8))
    with pytest.raises(PlanError, match="new --out"):
        run_prep(config(sorted_list, out, keep_order=True))


def test_written_order_depends_on_keys_and_seed_only() -> None:
    keys = [f"k{i}" for i in range(100)]
    order = written_order(keys, 0)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert written_order(keys, 0) == order and written_order(keys, 1) != order
    assert written_order(keys, None) == list(range(100))
    # a key's rank does not depend on where it stood: reversing the input reverses positions
    back = written_order(keys[::-1], 0)
    assert [keys[::-1][i] for i in back] == [keys[i] for i in order]
