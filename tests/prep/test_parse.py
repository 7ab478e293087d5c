"""Segment CSV / class index parsing and finding audio files by downloader names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep.locate import AudioIndex
from cmkd_scale.prep.segments import (
    SegmentsError,
    make_key,
    read_class_index,
    read_segments,
)
from tests.fixtures.prep import DOG, MUSIC, SPEECH, write_segments_csv


@pytest.fixture(scope="module")
def classes():
    return read_class_index(bundled_class_labels())


def test_real_class_index_with_quoted_commas(class_labels_csv: Path) -> None:
    idx = read_class_index(class_labels_csv)
    assert len(idx) == 527
    assert idx.classes[1].display_name == "Male speech, man speaking"
    assert idx.by_mid["/m/09x0r"] == 0 and idx.classes[526].index == 526


def test_real_eval_segments_parse_completely(shared_data: Path, classes) -> None:
    found = read_segments([shared_data / "audioset" / "eval_segments.csv"], classes)
    # the header says num_ysids=20371, num_positive_labels=51804
    assert len(found.segments) == 20371
    assert sum(len(s.labels) for s in found.segments) == 51804
    first = found.segments[0]
    assert (first.ytid, first.start, first.end, first.key) == (
        "--4gqARaEJE",
        0.0,
        10.0,
        "--4gqARaEJE_0",
    )
    assert first.mids == ("/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk")
    assert first.labels == tuple(classes.by_mid[m] for m in first.mids)
    assert (first.source, first.line) == ("eval_segments.csv", 4)
    assert not found.bad_lines and found.num_duplicates == 0


BAD_ROWS = [
    ('abc, 1.0, "/m/09x0r"', "expected 4 fields"),
    ('abc, x, 10.0, "/m/09x0r"', "not numbers"),
    ('abc, 10.0, 5.0, "/m/09x0r"', "start < end"),
    ('abc, 0.0, 10.0, ""', "no labels"),
    ('abc, 0.0, 10.0, "/m/09x0r,/m/nope"', "unknown MID '/m/nope'"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, classes, row, message) -> None:
    csv_path = write_segments_csv(tmp_path / "seg.csv", [("good1", 0.0, 10.0, [SPEECH])])
    csv_path.write_text(csv_path.read_text() + row + "\n")
    with pytest.raises(SegmentsError) as err:
        read_segments([csv_path], classes)
    text = str(err.value)
    assert f"{csv_path}:5:" in text and message in text and "--skip-bad-lines" in text


def test_skip_bad_lines_counts_and_keeps_the_rest(tmp_path, classes) -> None:
    csv_path = write_segments_csv(tmp_path / "seg.csv", [("good1", 0.0, 10.0, [SPEECH])])
    csv_path.write_text(
        csv_path.read_text() + "\n".join(r for r, _ in BAD_ROWS) + '\ngood2, 3, 13, "/m/04rlf"\n'
    )
    found = read_segments([csv_path], classes, skip_bad_lines=True)
    assert [s.ytid for s in found.segments] == ["good1", "good2"]
    assert [(b.line, b.source) for b in found.bad_lines] == [(n, "seg.csv") for n in range(5, 10)]
    assert "unknown MID" in found.bad_lines[-1].reason


def test_concatenation_deduplicates_by_ytid_and_start(tmp_path, classes) -> None:
    a = write_segments_csv(tmp_path / "a.csv", [("x1", 0, 10, [SPEECH]), ("x2", 5, 15, [DOG])])
    b = write_segments_csv(tmp_path / "b.csv", [("x2", 5, 15, [MUSIC]), ("x2", 20, 30, [DOG])])
    found = read_segments([a, b], classes)
    assert [s.key for s in found.segments] == ["x1_0", "x2_5000", "x2_20000"]
    assert found.segments[1].mids == (DOG,) and found.num_duplicates == 1
    assert [s["name"] for s in found.sources] == ["a.csv", "b.csv"]


@pytest.mark.parametrize("ytid", ["../../etc/x", "a b.c", "/abs/path", "x" * 200, "ö.."])
def test_hostile_ytids_give_safe_distinct_keys(ytid: str) -> None:
    key = make_key(ytid, 30000)
    assert key.endswith("_30000") and "." not in key and "/" not in key
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in key) and len(key) < 70
    assert make_key(ytid + "!", 30000) != key


def test_normal_ytid_key_is_unchanged() -> None:
    assert make_key("--4gqARaEJE", 0) == "--4gqARaEJE_0"
    assert make_key("a_b-c", 1500) == "a_b-c_1500"


def _segment(classes, ytid: str, start: float, end: float):
    from cmkd_scale.prep.segments import Segment

    return Segment(make_key(ytid, round(start * 1000)), ytid, start, end, (SPEECH,), (0,), "x", 1)


@pytest.mark.parametrize(
    "name",
    [
        "abcdefghijk.wav",
        "abcdefghijk_30.flac",
        "abcdefghijk_30.0.mp3",
        "abcdefghijk_30.000.m4a",
        "abcdefghijk_30000.opus",
        "abcdefghijk_30_40.webm",
        "abcdefghijk_30.000_40.000.ogg",
        "abcdefghijk_30000_40000.aac",
        "sub/dir/abcdefghijk_30.WAV",
    ],
)
def test_downloader_names_are_found(tmp_path, classes, name: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    (tmp_path / "abcdefghijk_31.wav").write_bytes(b"x")  # another segment of the same video
    (tmp_path / "notes.txt").write_text("not audio")
    index = AudioIndex.scan(tmp_path)
    found = index.find(_segment(classes, "abcdefghijk", 30.0, 40.0))
    assert found == str(path)
    assert index.find(_segment(classes, "zzzzzzzzzzz", 30.0, 40.0)) is None


def test_ytids_with_underscores_and_preference_order(tmp_path, classes) -> None:
    for name in ["ab_cd_efghi_30.mp3", "ab_cd_efghi_30.wav", "ab_cd_efghi.flac", "ab_cd_1_2.wav"]:
        (tmp_path / name).write_bytes(b"x")
    index = AudioIndex.scan(tmp_path)
    # the file naming the segment's start beats the bare-YTID file; wav beats mp3
    assert index.find(_segment(classes, "ab_cd_efghi", 30, 40)) == str(
        tmp_path / "ab_cd_efghi_30.wav"
    )
    assert index.find(_segment(classes, "ab_cd_efghi", 50, 60)) == str(
        tmp_path / "ab_cd_efghi.flac"
    )
    # "ab_cd_1_2" is either YTID ab_cd_1_2, or ab_cd with start 1 and end 2
    assert index.find(_segment(classes, "ab_cd", 1, 2)) == str(tmp_path / "ab_cd_1_2.wav")
    assert index.find(_segment(classes, "ab_cd_1_2", 0, 10)) == str(tmp_path / "ab_cd_1_2.wav")
    assert index.find(_segment(classes, "ab_cd", 1, 3)) is None
    assert index.relative(str(tmp_path / "ab_cd_1_2.wav")) == "ab_cd_1_2.wav"


def test_missing_audio_dir_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--audio-dir"):
        AudioIndex.scan(tmp_path / "nope")


def test_byte_order_mark_and_undecodable_bytes(tmp_path, classes) -> None:
    csv_path = write_segments_csv(tmp_path / "seg.csv", [("good1", 0.0, 10.0, [SPEECH])])
    data = b"\xef\xbb\xbf" + csv_path.read_bytes() + b'bad\xff\xfeid, 0, 10, "/m/09x0r"\n'
    csv_path.write_bytes(data)
    found = read_segments([csv_path], classes)
    assert [s.ytid for s in found.segments] == ["good1", "bad\ufffd\ufffdid"]
    assert found.segments[1].line == 5 and "." not in found.segments[1].key
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b'index,mid,display_name\n0,/m/x,"Sp\xffeech"\n')
    with pytest.raises(SegmentsError, match="not UTF-8"):
        read_class_index(labels)
