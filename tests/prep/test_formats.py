"""--format esc50 / fsd50k / csv: each dataset's published metadata layout + generated audio
through the real prep, read back from the shards (tar, DALI index, manifest, weights)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep import ConfigError, PrepConfig, SegmentsError, run_prep, verify
from cmkd_scale.prep.shards import index_from_tar
from tests.fixtures.prep import dominant_frequency, tone, write_audio

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------- helpers


def samples(out: Path) -> dict[str, dict]:
    """key -> {"json": record, "labels": multi-hot, "flac": wave, "shard": name}, manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, dict] = {}
    for shard in manifest["shards"]:
        tar_path = out / shard["name"]
        with open(tar_path, "rb") as f:  # the DALI index matches the tar's own offsets
            assert (out / shard["index"]).read_bytes() == index_from_tar(f)
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                data = tar.extractfile(m).read()
                entry = found.setdefault(key, {"shard": shard["name"]})
                if ext == "json":
                    entry["json"] = json.loads(data)
                elif ext == "labels":
                    entry["labels"] = np.frombuffer(data, dtype="<f4")
                else:
                    entry["flac"], entry["sr"] = sf.read(io.BytesIO(data))
    return found


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def balanced_weights(label_lists: list[list[int]], num_classes: int) -> np.ndarray:
    """AST's gen_weight_file.py, recomputed here from the shards' labels."""
    count = np.zeros(num_classes)
    for labels in label_lists:
        count[labels] += 1
    class_weight = 1000.0 / (count + 0.01)
    return np.array([sum(class_weight[i] for i in labels) for labels in label_lists])


def check_manifest(out: Path, found: dict[str, dict]) -> dict:
    """What every format shares: verify passes, counts and weights follow the shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert verify(str(out)) == []
    assert manifest["num_samples"] == len(found)
    labels = [np.flatnonzero(found[k]["labels"]).tolist() for k in found]
    counts = np.zeros(manifest["num_classes"], dtype=int)
    for lab in labels:
        counts[lab] += 1
    assert manifest["class_counts"] == counts.tolist()
    weights = np.load(out / "weights.npy")
    assert np.array_equal(weights, balanced_weights(labels, manifest["num_classes"]))
    for entry in found.values():
        assert entry["sr"] == 16000 and entry["flac"].ndim == 1
        hot = np.flatnonzero(entry["labels"]).tolist()
        assert hot == sorted(entry["json"]["labels"])
    return manifest


def esc_wave(target: int, seconds: float = 5.0) -> np.ndarray:
    """ESC-50 clips are 5 s, 44.1 kHz mono; each class its own tone."""
    return tone(200 + 20 * target, seconds, 44100)


# ---------------------------------------------------------------------------- ESC-50

ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take"
# rows as published in meta/esc50.csv (karolpiczak/ESC-50), a few per class and fold
ESC50_ROWS = [
    "1-100032-A-0.wav,1,0,dog,True,100032,A",
    "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A",
    "1-17367-A-10.wav,1,10,rain,True,17367,A",
    "2-114280-A-0.wav,2,0,dog,True,114280,A",
    "2-101676-A-10.wav,2,10,rain,True,101676,A",
    "2-109505-A-14.wav,2,14,chirping_birds,False,109505,A",
    "3-115545-A-48.wav,3,48,fireworks,False,115545,A",
    "4-181286-A-10.wav,4,10,rain,True,181286,A",
    "4-194754-A-48.wav,4,48,fireworks,False,194754,A",
    "5-9032-A-0.wav,5,0,dog,True,9032,A",
    "5-200334-A-1.wav,5,1,rooster,True,200334,A",
]
ESC_TARGETS = [0, 1, 10, 14, 48]


def write_esc50(root: Path, rows: list[str] = ESC50_ROWS) -> Path:
    """ESC-50-master/meta/esc50.csv + audio/{filename} (5 s 44.1 kHz WAV, as released)."""
    meta = root / "ESC-50-master" / "meta" / "esc50.csv"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text("\n".join([ESC50_HEADER, *rows]) + "\n")
    return meta


@pytest.fixture(scope="module")
def esc50(tmp_path_factory) -> tuple[Path, Path]:
    """Folds 1-4 of the ESC-50 layout: one clip stored as .ogg (same stem), one 3 s long,
    one without audio."""
    root = tmp_path_factory.mktemp("esc50")
    meta = write_esc50(root)
    audio = root / "ESC-50-master" / "audio"
    for row in ESC50_ROWS:
        filename, _, target = row.split(",")[:3]
        if filename == "4-194754-A-48.wav":
            continue  # no audio: missing.csv
        seconds = 3.0 if filename == "2-101676-A-10.wav" else 5.0
        if filename == "3-115545-A-48.wav":
            filename = "3-115545-A-48.ogg"  # same stem, another extension
        write_audio(audio / filename, esc_wave(int(target), seconds), 44100)
    out = root / "out"
    run_prep(
        PrepConfig(
            format="esc50", segments=[meta], audio_dir=audio, out=str(out), folds=(1, 2, 3, 4),
            shard_size=3,
        )
    )  # fmt: skip
    return root, out


def test_esc50_shards_labels_classes_and_manifest(esc50) -> None:
    _, out = esc50
    found = samples(out)
    manifest = check_manifest(out, found)
    # the class index: every target of the CSV (fold 5 too), in target order, named by category
    assert manifest["input_format"] == "esc50" and manifest["order_seed"] == 0
    assert [(c["index"], c["target"], c["display_name"]) for c in manifest["classes"]] == [
        (0, 0, "dog"), (1, 1, "rooster"), (2, 10, "rain"), (3, 14, "chirping_birds"),
        (4, 48, "fireworks"),
    ]  # fmt: skip
    assert manifest["num_classes"] == 5 and manifest["settings"]["selection"] == {
        "folds": [1, 2, 3, 4]
    }
    # folds 1-4 only: 9 rows, one without audio
    fold14 = [r.split(",")[0].removesuffix(".wav") for r in ESC50_ROWS if r[0] in "1234"]
    assert set(found) == set(fold14) - {"4-194754-A-48"}
    by_target = {c["target"]: c["index"] for c in manifest["classes"]}
    for key, entry in found.items():
        target = int(key.rsplit("-", 1)[1])
        assert np.flatnonzero(entry["labels"]).tolist() == [by_target[target]], key
        assert dominant_frequency(entry["flac"], 16000) == pytest.approx(200 + 20 * target, abs=3)
        record = entry["json"]
        assert record["source"] == "esc50.csv" and record["ytid"] == key
    # the clip length comes from the file: 5 s, and 3 s for the short one (nothing cut)
    assert found["1-100032-A-0"]["json"]["duration"] == 5.0
    assert found["2-101676-A-10"]["json"]["duration"] == 3.0
    assert found["2-101676-A-10"]["json"]["end"] == 3.0
    assert found["3-115545-A-48"]["json"]["audio"] == "3-115545-A-48.ogg"
    missing = read_csv(out / "missing.csv")
    assert [(r["source"], r["line"], r["ytid"]) for r in missing] == [
        ("esc50.csv", "10", "4-194754-A-48")
    ]
    assert read_csv(out / "failed.csv") == []


def test_esc10_in_the_2015_release_naming(tmp_path: Path) -> None:
    """ESC-10 as commonly distributed: a folder per class, files {fold}-{src_file}-{take}.ogg."""
    meta = write_esc50(tmp_path)
    audio = tmp_path / "ESC-10"
    folders = {0: "001 - Dog bark", 1: "010 - Rooster", 10: "002 - Rain"}
    for row in ESC50_ROWS:
        _, fold, target, _, esc10, src_file, take = row.split(",")
        if esc10 == "True":
            name = f"{folders[int(target)]}/{fold}-{src_file}-{take}.ogg"
            write_audio(audio / name, esc_wave(int(target)), 44100)
    out = tmp_path / "out"
    manifest = run_prep(
        PrepConfig(format="esc50", segments=[meta], audio_dir=audio, out=str(out), esc10=True)
    )
    found = samples(out)
    check_manifest(out, found)
    assert [(c["index"], c["target"], c["display_name"]) for c in manifest["classes"]] == [
        (0, 0, "dog"), (1, 1, "rooster"), (2, 10, "rain")
    ]  # fmt: skip
    assert manifest["num_samples"] == 7 and manifest["num_missing"] == 0
    assert found["5-200334-A-1"]["json"]["audio"] == "010 - Rooster/5-200334-A.ogg"
    assert "1-100038-A-14" not in found  # not an ESC-10 row


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1-5996-A-6.wav,1,x,hen,False,5996,A", "fold '1' / target 'x' are not integers"),
        ("1-5996-A-6.wav,1,6,hen,maybe,5996,A", "esc10 is 'maybe', expected True or False"),
        (
            "1-5996-A-6.wav,1,6,hen,False",
            "expected 7 fields (filename,fold,target,category,esc10,src_file,take), got 5",
        ),
        ("1-5996-A-0.wav,1,0,cat,False,5996,A", "target 0 is 'cat' here but 'dog' at esc50.csv:2"),
    ],
)
def test_esc50_malformed_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    meta = write_esc50(tmp_path, [*ESC50_ROWS[:3], row])
    config = PrepConfig(format="esc50", segments=[meta], audio_dir=tmp_path, out=str(tmp_path))
    with pytest.raises(SegmentsError) as err:
        run_prep(config)
    assert str(err.value) == f"{meta}:5: {message}; fix the line or pass --skip-bad-lines"


def test_esc50_header_must_be_the_published_one(tmp_path: Path) -> None:
    meta = tmp_path / "esc50.csv"
    meta.write_text("filename,fold,target,category\n1-100032-A-0.wav,1,0,dog\n")
    config = PrepConfig(format="esc50", segments=[meta], audio_dir=tmp_path, out=str(tmp_path))
    with pytest.raises(SegmentsError, match=r"esc50\.csv:1: expected ESC-50's header"):
        run_prep(config)


# ---------------------------------------------------------------------------- FSD50K

# a 9-class slice of FSD50K.ground_truth/vocabulary.csv (no header: index,name,mid)
FSD_VOCABULARY = """\
0,Bark,/m/05tny_
1,Dog,/m/0bt9lr
2,Domestic_animals_and_pets,/m/068hy
3,Animal,/m/0jbk
4,Electric_guitar,/m/02sgy
5,Guitar,/m/0342h
6,Music,/m/04rlf
7,Male_speech_and_man_speaking,/m/05zppz
8,Speech,/m/09x0r
"""
DOG_LABELS = '"Bark,Dog,Domestic_animals_and_pets,Animal","/m/05tny_,/m/0bt9lr,/m/068hy,/m/0jbk"'
GUITAR_LABELS = '"Electric_guitar,Guitar,Music","/m/02sgy,/m/0342h,/m/04rlf"'
SPEECH_LABELS = '"Male_speech_and_man_speaking,Speech","/m/05zppz,/m/09x0r"'
FSD_DEV = [  # fname -> (labels+mids, split, seconds): FSD50K clips are 0.3-30 s
    ("64760", GUITAR_LABELS, "train", 12.0),
    ("16399", DOG_LABELS, "train", 0.4),
    ("16401", SPEECH_LABELS, "val", 2.5),
    ("200", DOG_LABELS, "train", 1.0),
    ("377452", SPEECH_LABELS, "train", None),  # no audio
]
FSD_EVAL = [("37199", DOG_LABELS, 3.0), ("175151", GUITAR_LABELS, 1.5)]
FSD_FREQ = {"Bark": 500.0, "Electric_guitar": 700.0, "Male_speech_and_man_speaking": 900.0}


@pytest.fixture(scope="module")
def fsd50k(tmp_path_factory) -> Path:
    """FSD50K's layout: FSD50K.ground_truth/{vocabulary,dev,eval}.csv, FSD50K.dev_audio/*.wav."""
    root = tmp_path_factory.mktemp("fsd50k")
    gt = root / "FSD50K.ground_truth"
    gt.mkdir()
    (gt / "vocabulary.csv").write_text(FSD_VOCABULARY)
    dev = ["fname,labels,mids,split"] + [f"{f},{lab},{s}" for f, lab, s, _ in FSD_DEV]
    (gt / "dev.csv").write_text("\n".join(dev) + "\n")
    (gt / "eval.csv").write_text(
        "\n".join(["fname,labels,mids"] + [f"{f},{lab}" for f, lab, _ in FSD_EVAL]) + "\n"
    )
    for folder, clips in (
        ("FSD50K.dev_audio", [(f, lab, s) for f, lab, _, s in FSD_DEV]),
        ("FSD50K.eval_audio", FSD_EVAL),
    ):
        for fname, labels, seconds in clips:
            if seconds is not None:
                freq = FSD_FREQ[labels.strip('"').split(",")[0]]
                write_audio(root / folder / f"{fname}.wav", tone(freq, seconds, 44100), 44100)
    return root


def fsd_config(root: Path, out: Path, segments: str, **options) -> PrepConfig:
    audio = "FSD50K.eval_audio" if segments == "eval.csv" else "FSD50K.dev_audio"
    return PrepConfig(
        format="fsd50k",
        segments=[root / "FSD50K.ground_truth" / segments],
        class_labels=root / "FSD50K.ground_truth" / "vocabulary.csv",
        audio_dir=root / audio,
        out=str(out),
        **options,
    )


def test_fsd50k_dev_train_split_multilabel(fsd50k: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    manifest = run_prep(fsd_config(fsd50k, out, "dev.csv", split="train", shard_size=2))
    found = samples(out)
    check_manifest(out, found)
    assert manifest["input_format"] == "fsd50k" and manifest["num_classes"] == 9
    assert manifest["classes"][0] == {"index": 0, "mid": "/m/05tny_", "display_name": "Bark"}
    assert manifest["settings"]["selection"] == {"split": "train"}
    assert set(found) == {"64760", "16399", "200"}  # the val row is left out
    assert np.flatnonzero(found["64760"]["labels"]).tolist() == [4, 5, 6]
    assert found["16399"]["json"]["mids"] == ["/m/05tny_", "/m/0bt9lr", "/m/068hy", "/m/0jbk"]
    # variable length, whole file: 12 s and 0.4 s
    assert found["64760"]["json"]["duration"] == 12.0 and len(found["64760"]["flac"]) == 192000
    assert found["16399"]["json"]["duration"] == pytest.approx(0.4)
    assert dominant_frequency(found["64760"]["flac"], 16000) == pytest.approx(700, abs=3)
    assert [r["ytid"] for r in read_csv(out / "missing.csv")] == ["377452"]
    # val and eval.csv
    val = run_prep(fsd_config(fsd50k, tmp_path / "val", "dev.csv", split="val"))
    assert val["num_samples"] == 1 and val["class_counts"][7] == 1
    ev = run_prep(fsd_config(fsd50k, tmp_path / "eval", "eval.csv"))
    assert ev["num_samples"] == 2 and ev["classes"] == manifest["classes"]


def test_fsd50k_split_needs_dev_csv_and_bad_rows_name_the_line(
    fsd50k: Path, tmp_path: Path
) -> None:
    with pytest.raises(SegmentsError, match=r"eval\.csv: has no split column"):
        run_prep(fsd_config(fsd50k, tmp_path / "o1", "eval.csv", split="val"))
    bad = fsd50k / "FSD50K.ground_truth" / "bad.csv"
    bad.write_text(
        "fname,labels,mids,split\n"
        f"64760,{GUITAR_LABELS},train\n"
        '99,"Bark,Meow","/m/05tny_,/m/07qrkrw",train\n'
    )
    with pytest.raises(SegmentsError) as err:
        run_prep(fsd_config(fsd50k, tmp_path / "o2", "bad.csv"))
    assert str(err.value).startswith(f"{bad}:3: unknown label 'Meow'")
    assert str(err.value).endswith("; fix the line or pass --skip-bad-lines")
    manifest = run_prep(fsd_config(fsd50k, tmp_path / "o3", "bad.csv", skip_bad_lines=True))
    assert manifest["num_bad_lines"] == 1 and manifest["num_samples"] == 1
    assert read_csv(tmp_path / "o3" / "bad_lines.csv")[0]["line"] == "3"


def test_fsd50k_vocabulary_has_no_header(tmp_path: Path) -> None:
    from cmkd_scale.prep.formats import read_fsd50k_vocabulary

    vocab = tmp_path / "vocabulary.csv"
    vocab.write_text("label,mid\n0,Bark,/m/05tny_\n")
    with pytest.raises(SegmentsError, match=r"vocabulary\.csv:1: expected 3 fields"):
        read_fsd50k_vocabulary(vocab)
    vocab.write_text(FSD_VOCABULARY)
    assert len(read_fsd50k_vocabulary(vocab)) == 9


# ---------------------------------------------------------------------------- csv


@pytest.fixture(scope="module")
def generic(tmp_path_factory) -> Path:
    """Any dataset: list.csv (file,labels,fold) with paths under --audio-dir, classes.txt."""
    root = tmp_path_factory.mktemp("generic")
    (root / "classes.txt").write_text("cat\ndog\nbird song\n")
    rows = [
        ("cats/c1.wav", "cat", 1, 300),
        ("dogs/d 1.flac", "dog", 1, 500),  # a space: the key is rewritten and hashed
        ("mixed/cd.wav", "cat,dog", 2, 400),
        ("birds/b1.mp3", "bird song", 2, 800),
        ("dogs/d2.wav", "dog", 3, 600),  # stored as d2.flac: another extension
        ("cats/none.wav", "cat", 3, None),  # no audio
    ]
    with open(root / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "labels", "fold"])
        for file, labels, fold, _ in rows:
            w.writerow([file, labels, fold])
    for file, _, _, freq in rows:
        if freq is not None:
            name = file.replace("d2.wav", "d2.flac")
            write_audio(root / "audio" / name, tone(freq, 1.5, 22050), 22050)
    return root


def test_csv_format_with_class_list_folds_and_paths(generic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = PrepConfig(
        format="csv", segments=[generic / "list.csv"], class_labels=generic / "classes.txt",
        audio_dir=generic / "audio", out=str(out), folds=(1, 2, 3),
    )  # fmt: skip
    manifest = run_prep(config)
    found = samples(out)
    check_manifest(out, found)
    assert manifest["input_format"] == "csv"
    assert [c["display_name"] for c in manifest["classes"]] == ["cat", "dog", "bird song"]
    by_audio = {e["json"]["audio"]: e for e in found.values()}
    assert set(by_audio) == {
        "cats/c1.wav", "dogs/d 1.flac", "mixed/cd.wav", "birds/b1.mp3", "dogs/d2.flac"
    }  # fmt: skip
    assert np.flatnonzero(by_audio["mixed/cd.wav"]["labels"]).tolist() == [0, 1]
    assert np.flatnonzero(by_audio["birds/b1.mp3"]["labels"]).tolist() == [2]
    keys = list(found)
    assert all(c.isalnum() or c in "_-" for k in keys for c in k)
    assert len(set(keys)) == len(keys) and by_audio["dogs/d 1.flac"]["json"]["ytid"] == "dogs/d 1"
    assert by_audio["cats/c1.wav"]["json"]["duration"] == 1.5
    assert [r["ytid"] for r in read_csv(out / "missing.csv")] == ["cats/none"]
    # --folds 1 keeps two rows
    one = run_prep(PrepConfig(**{**config.__dict__, "out": str(tmp_path / "f1"), "folds": (1,)}))
    assert one["num_samples"] == 2


def test_csv_format_with_an_audioset_style_class_csv(tmp_path: Path) -> None:
    """A class CSV with a display_name column (here AudioSet's own index: names hold commas)."""
    write_audio(tmp_path / "audio" / "a.wav", tone(440, 1.0, 16000), 16000)
    seg = tmp_path / "list.csv"
    seg.write_text('file,labels\na.wav,"Male speech, man speaking,Speech"\n')
    out = tmp_path / "out"
    manifest = run_prep(
        PrepConfig(format="csv", segments=[seg], class_labels=bundled_class_labels(),
                   audio_dir=tmp_path / "audio", out=str(out))
    )  # fmt: skip
    assert manifest["num_classes"] == 527 and manifest["class_counts"][1] == 1
    record = samples(out)["a"]["json"]
    assert record["labels"] == [1, 0] and record["mids"] == ["/m/05zppz", "/m/09x0r"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("../outside.wav,cat,1", "file '../outside.wav' leaves --audio-dir"),
        ("/etc/passwd,cat,1", "file '/etc/passwd' is absolute: give it relative to --audio-dir"),
        ("cats/c9.wav,lion,1", "unknown label 'lion' (not in --class-labels)"),
        ("cats/c9.wav,cat,one", "fold 'one' is not an integer"),
        ("cats/c9.wav,,1", "no labels"),
    ],
)
def test_csv_malformed_row_names_file_and_line(
    generic: Path, tmp_path: Path, row: str, message: str
) -> None:
    seg = tmp_path / "list.csv"
    seg.write_text(f"file,labels,fold\ncats/c1.wav,cat,1\n{row}\n")
    config = PrepConfig(format="csv", segments=[seg], class_labels=generic / "classes.txt",
                        audio_dir=generic / "audio", out=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(SegmentsError) as err:
        run_prep(config)
    assert str(err.value) == f"{seg}:3: {message}; fix the line or pass --skip-bad-lines"


def test_csv_folds_need_a_fold_column(generic: Path, tmp_path: Path) -> None:
    seg = tmp_path / "list.csv"
    seg.write_text("file,labels\ncats/c1.wav,cat\n")
    config = PrepConfig(
        format="csv", segments=[seg], class_labels=generic / "classes.txt",
        audio_dir=generic / "audio", out=str(tmp_path / "o"), folds=(1,),
    )  # fmt: skip
    with pytest.raises(SegmentsError, match="--folds needs a 'fold' column"):
        run_prep(config)


# ---------------------------------------------------------------------------- PrepConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "esc50", "class_labels": "x.csv"}, "--class-labels is not used with"),
        ({"format": "fsd50k"}, "--format fsd50k needs --class-labels"),
        ({"format": "audioset", "class_labels": "c.csv", "folds": (1,)}, "--folds applies to"),
        ({"format": "csv", "class_labels": "c.txt", "esc10": True}, "--esc10 applies to"),
        ({"format": "csv", "class_labels": "c.txt", "split": "val"}, "--split applies to"),
        ({"format": "fsd50k", "class_labels": "v.csv", "split": "test"}, "--split must be one"),
        ({"format": "flac", "class_labels": "c.csv"}, "--format 'flac' is unknown"),
        ({"class_labels": "c.csv", "workers": 0}, "--workers must be >= 1, got 0"),
        ({"class_labels": "c.csv", "shard_size": 0}, "--shard-size must be >= 1, got 0"),
        ({"class_labels": "c.csv", "order_seed": -1}, "--order-seed must be in [0, 2**63)"),
        ({"class_labels": "c.csv", "order_seed": 3, "keep_order": True}, "no effect with"),
        ({"class_labels": "c.csv", "num_tasks": 2, "task_id": 2}, "need 0 <= --task-id"),
    ],
)
def test_prep_config_names_the_option_and_the_fix(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        PrepConfig(segments=["s.csv"], audio_dir="a", **options)
    assert message in str(err.value)


def test_prep_config_is_frozen_typed_and_keyword_only() -> None:
    config = PrepConfig(segments="s.csv", audio_dir="a", class_labels="c.csv")
    assert config.segments == (Path("s.csv"),) and config.audio_dir == Path("a")
    assert config.order == 0 and PrepConfig(**{**config.__dict__, "keep_order": True}).order is None
    with pytest.raises(AttributeError):
        config.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        PrepConfig(["s.csv"], "a")  # type: ignore[misc]


def test_cli_formats_and_option_errors(generic: Path, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "cmkd_scale.prep", "--audio-dir", str(generic / "audio")]
    proc = subprocess.run(
        [*base, "--format", "esc50", "--segments", "x.csv", "--class-labels", "c.csv"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "--class-labels is not used with --format esc50" in proc.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        [*base, "--format", "csv", "--segments", str(generic / "list.csv"), "--class-labels",
         str(generic / "classes.txt"), "--folds", "1,2", "--out", str(out), "--keep-order"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["order_seed"] is None
    assert manifest["settings"]["selection"] == {"folds": [1, 2]}


def test_esc50_csv_given_twice_counts_duplicates(tmp_path: Path) -> None:
    from cmkd_scale.prep.formats import read_inputs

    meta = write_esc50(tmp_path)
    config = PrepConfig(format="esc50", segments=[meta, meta], audio_dir=tmp_path)
    classes, found = read_inputs(config)
    assert len(classes) == len(ESC_TARGETS) and len(found.segments) == len(ESC50_ROWS)
    assert found.num_duplicates == len(ESC50_ROWS) and len(found.sources) == 2


def test_class_list_that_is_not_utf8_is_a_clear_error(generic: Path, tmp_path: Path) -> None:
    bad = tmp_path / "classes.txt"
    bad.write_bytes(b"cat\n\xff\xfedog\n")
    config = PrepConfig(format="csv", segments=[generic / "list.csv"], class_labels=bad,
                        audio_dir=generic / "audio", out=str(tmp_path / "o"))  # fmt: skip
    with pytest.raises(SegmentsError, match=r"--class-labels .*classes\.txt is not UTF-8 text"):
        run_prep(config)
