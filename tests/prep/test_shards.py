"""End to end: generated clips in every format + real clips + broken inputs -> shards.

One module-scoped prep run over a small corpus; the tests read what it wrote with soundfile,
webdataset, DALI's real CPU webdataset reader and audio decoder, and ``verify``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cmkd_scale.demo.synth import bundled_class_labels
from cmkd_scale.prep import SegmentsError, run_prep, verify
from tests.fixtures.prep import (
    CAR,
    DOG,
    DOG_IDX,
    FORMATS,
    MUSIC,
    MUSIC_IDX,
    SPEECH,
    SPEECH_IDX,
    dominant_frequency,
    native_rate,
    tone,
    write_audio,
    write_segments_csv,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Corpus:
    root: Path
    out: Path
    manifest: dict
    freqs: dict[str, float]  # key -> tone frequency expected in the output


def _build_corpus(root: Path, real_wav: Path | None, real_mp3: Path | None) -> tuple:
    audio = root / "audio"
    rows: list[tuple[str, float, float, list[str]]] = []
    freqs: dict[str, float] = {}
    written: dict[str, Path] = {}
    # 3 s stereo 44.1 kHz tones (opus/webm at 48 kHz), one format each, in subfolders
    for i, fmt in enumerate(FORMATS):
        ytid = f"fmt{fmt:_<8}"[:11]
        freq = 400.0 + 150.0 * i
        sr = native_rate(fmt, 44100)
        written[fmt] = write_audio(
            audio / fmt / f"{ytid}_10.{fmt}", tone(freq, 3.0, sr, channels=2), sr
        )
        rows.append((ytid, 10.0, 13.0, [SPEECH, MUSIC] if i % 2 else [DOG]))
        freqs[f"{ytid}_10000"] = freq
    # a 40 s "whole video": 200 Hz for 30 s, then 1 kHz; the segment [30, 40] must be the 1 kHz
    video = np.concatenate([tone(200.0, 30.0, 16000), tone(1000.0, 10.0, 16000)])
    write_audio(audio / "wholevideo1.flac", video, 16000)
    rows.append(("wholevideo1", 30.0, 40.0, [CAR]))
    freqs["wholevideo1_30000"] = 1000.0
    # the same through the PyAV path (m4a)
    write_audio(
        audio / "wholevideo2.m4a",
        np.concatenate([tone(300.0, 30.0, 22050), tone(700.0, 10.0, 22050)]),
        22050,
    )
    rows.append(("wholevideo2", 30.0, 40.0, [CAR, DOG]))
    freqs["wholevideo2_30000"] = 700.0
    # a 15 s file named for its segment is taken as is (no cut)
    write_audio(audio / "fifteen_sec_2_17.wav", tone(880.0, 15.0, 32000), 32000)
    rows.append(("fifteen_sec", 2.0, 17.0, [MUSIC]))
    freqs["fifteen_sec_2000"] = 880.0
    # silence is valid audio
    write_audio(audio / "silentclip1.wav", np.zeros((32000, 1), np.float32), 16000)
    rows.append(("silentclip1", 0.0, 2.0, [SPEECH]))
    # broken inputs (positions 12-15, i.e. all of shard 3): each must end up in failed.csv
    data = written["wav"].read_bytes()
    (audio / "truncwav123_0.wav").write_bytes(data[: len(data) // 2])
    flac = written["flac"].read_bytes()
    (audio / "truncflac12_0.flac").write_bytes(flac[: len(flac) // 2])
    (audio / "emptyfile12_0.wav").write_bytes(b"")
    (audio / "textfile123_0.mp3").write_text("this is not audio\n" * 50)
    for ytid in ("truncwav123", "truncflac12", "emptyfile12", "textfile123"):
        rows.append((ytid, 0.0, 3.0, [DOG]))
    # a YTID with characters that must not reach a path, with a real file
    write_audio(audio / "we.ird;id_0.wav", tone(500.0, 1.0, 16000), 16000)
    rows.append(("we.ird;id", 0.0, 1.0, [SPEECH]))
    # no audio at all, and a hostile YTID that can only be missing
    rows.append(("nosuchclip1", 0.0, 10.0, [SPEECH]))
    rows.append(("../../etc/x", 0.0, 10.0, [SPEECH]))
    # the real AudioSet clip in both formats (7 s, 32 kHz mono)
    if real_wav is not None:
        shutil.copy(real_wav, audio / "R9_ZSCveAHg_30.000.wav")
        shutil.copy(real_mp3, audio / "R9_ZSCveAHg_40000.mp3")
        rows.append(("R9_ZSCveAHg", 30.0, 40.0, [SPEECH, MUSIC]))
        rows.append(("R9_ZSCveAHg", 40.0, 50.0, [SPEECH]))
    csv_path = write_segments_csv(root / "segments.csv", rows)
    # a row with an unknown MID: counted as a bad line (skip_bad_lines=True below)
    csv_path.write_text(csv_path.read_text() + 'unknownmid1, 0.000, 10.000, "/m/notamid"\n')
    return csv_path, audio, freqs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request) -> Corpus:
    root = tmp_path_factory.mktemp("prep_corpus")
    try:
        shared = request.getfixturevalue("shared_data")
        real = (shared / "audio" / "R9_ZSCveAHg_7s.wav", shared / "audio" / "R9_ZSCveAHg_7s.mp3")
    except pytest.skip.Exception:
        real = (None, None)
    csv_path, audio, freqs = _build_corpus(root, *real)
    out = root / "out"
    # input order (keep_order): shard j holds CSV rows [4j, 4j+4), which the tests below use
    manifest = run_prep(
        [csv_path],
        bundled_class_labels(),
        audio,
        str(out),
        shard_size=4,
        skip_bad_lines=True,
        keep_order=True,
    )
    return Corpus(root, out, manifest, freqs)


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_good_clips_land_and_broken_ones_are_reported(corpus: Corpus) -> None:
    m = corpus.manifest
    keys = list(_samples(corpus.out))
    has_real = "R9_ZSCveAHg_30000" in keys
    assert m["num_samples"] == len(keys) == len(FORMATS) + 5 + (2 if has_real else 0)
    assert set(corpus.freqs) <= set(keys) and "silentclip1_0" in keys
    failed = {r["ytid"]: r for r in _read_csv(corpus.out / "failed.csv")}
    assert set(failed) == {"truncwav123", "truncflac12", "emptyfile12", "textfile123"}
    assert "truncated" in failed["truncwav123"]["reason"]
    assert (
        "sync" in failed["truncflac12"]["reason"] or "truncated" in failed["truncflac12"]["reason"]
    )
    assert failed["textfile123"]["audio"] == "textfile123_0.mp3"
    assert "av:" in failed["emptyfile12"]["reason"]  # both decoders were tried
    missing = [r["ytid"] for r in _read_csv(corpus.out / "missing.csv")]
    assert missing == ["nosuchclip1", "../../etc/x"]
    bad = _read_csv(corpus.out / "bad_lines.csv")
    assert len(bad) == 1 and "unknown MID '/m/notamid'" in bad[0]["reason"]
    assert (m["num_failed"], m["num_missing"], m["num_bad_lines"]) == (4, 2, 1)
    assert not any(k in keys for k in failed)


def test_hostile_ytid_writes_only_inside_out(corpus: Corpus) -> None:
    keys = list(_samples(corpus.out))
    weird = [k for k in keys if k.startswith("we-ird-id")]
    assert len(weird) == 1 and weird[0].endswith("_0")
    assert all(c.isalnum() or c in "_-" for k in keys for c in k)
    # nothing outside the corpus folder was created by the run
    assert sorted(p.name for p in corpus.root.iterdir()) == ["audio", "out", "segments.csv"]
    assert not list(corpus.out.rglob("*/*")), "prep wrote into a subfolder of --out"


def test_output_is_16k_mono_flac_with_the_right_content(corpus: Corpus) -> None:
    samples = _samples(corpus.out)
    for key, members in samples.items():
        info = sf.info(io.BytesIO(members["flac"]))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (
            16000,
            1,
            "FLAC",
            "PCM_16",
        ), key
        record = json.loads(members["json"])
        assert record["key"] == key and record["duration"] == pytest.approx(info.frames / 16000)
    for key, freq in corpus.freqs.items():
        wave, sr = sf.read(io.BytesIO(samples[key]["flac"]))
        assert dominant_frequency(wave, sr) == pytest.approx(freq, abs=3), key
        # amplitude 0.5 survives codecs + resampling (ends excluded: lossy codecs ring there)
        assert 0.4 < np.abs(wave[1600:-1600]).max() < 0.6, key
    # the whole-video cut took [30, 40]: 10 s, and the 200 Hz part is gone
    for key in ("wholevideo1_30000", "wholevideo2_30000"):
        wave, _ = sf.read(io.BytesIO(samples[key]["flac"]))
        assert len(wave) == pytest.approx(160000, abs=1200)
    assert json.loads(samples["fifteen_sec_2000"]["json"])["duration"] == pytest.approx(15.0)
    silent, _ = sf.read(io.BytesIO(samples["silentclip1_0"]["flac"]), dtype="int16")
    assert len(silent) == 32000 and not silent.any()


def test_real_clip_from_wav_and_mp3(corpus: Corpus, real_clip_wav: Path) -> None:
    samples = _samples(corpus.out)
    ref, sr = sf.read(real_clip_wav)
    assert sr == 32000
    from_wav, _ = sf.read(io.BytesIO(samples["R9_ZSCveAHg_30000"]["flac"]))
    from_mp3, _ = sf.read(io.BytesIO(samples["R9_ZSCveAHg_40000"]["flac"]))
    assert len(from_wav) == len(ref) // 2  # 7 s at 32 kHz -> 7 s at 16 kHz
    assert abs(len(from_mp3) - len(from_wav)) < 0.06 * 16000
    # both decodes describe the same audio: strongly correlated after alignment
    n = min(len(from_wav), len(from_mp3))
    xc = np.correlate(from_mp3[:n], from_wav[2000 : n - 2000], mode="valid")
    peak = xc.max() / (np.linalg.norm(from_wav[2000 : n - 2000]) * np.linalg.norm(from_mp3[:n]))
    assert peak > 0.8
    record = json.loads(samples["R9_ZSCveAHg_30000"]["json"])
    assert record["labels"] == [SPEECH_IDX, MUSIC_IDX] and record["mids"] == [SPEECH, MUSIC]
    assert record["source"] == "segments.csv" and record["audio"] == "R9_ZSCveAHg_30.000.wav"


def test_labels_member_and_manifest_counts(corpus: Corpus) -> None:
    m = corpus.manifest
    samples = _samples(corpus.out)
    counts = np.zeros(527, dtype=int)
    for members in samples.values():
        labels = json.loads(members["json"])["labels"]
        vec = np.frombuffer(members["labels"], dtype="<f4")
        assert vec.shape == (527,) and sorted(np.flatnonzero(vec)) == sorted(labels)
        counts[labels] += 1
    assert m["class_counts"] == counts.tolist() and counts[DOG_IDX] > 0
    assert m["format"] == "cmkd_scale.shards/1" and m["sample_rate"] == 16000
    assert len(m["classes"]) == m["num_classes"] == 527
    assert m["classes"][1] == {
        "index": 1,
        "mid": "/m/05zppz",
        "display_name": "Male speech, man speaking",
    }
    first = 0
    for shard in m["shards"]:
        tar = corpus.out / shard["name"]
        assert shard["bytes"] == tar.stat().st_size and shard["first_sample"] == first
        first += shard["num_samples"]
        assert shard["index"] == shard["name"].replace(".tar", ".idx")
    assert first == m["num_samples"]
    assert m["sources"][0]["name"] == "segments.csv" and m["settings"]["shard_size"] == 4
    # shard j holds positions [4j, 4j+4): shard 3 covers only broken rows, so it has no tar
    names = [s["name"] for s in m["shards"]]
    assert names == sorted(names) and "shard-000003.tar" not in names
    assert not (corpus.out / "shard-000003.tar").exists()


def test_weights_follow_ast_gen_weight_file(corpus: Corpus) -> None:
    """Recompute AST's balanced weights the way its script does, from the shards' labels."""
    samples = _samples(corpus.out)
    label_lists = [json.loads(s["json"])["labels"] for s in samples.values()]
    label_count = np.zeros(527)
    for labels in label_lists:
        for idx in labels:
            label_count[idx] = label_count[idx] + 1
    label_weight = 1000.0 / (label_count + 0.01)
    expected = np.zeros(len(label_lists))
    for i, labels in enumerate(label_lists):
        for idx in labels:
            expected[i] += label_weight[idx]
    weights = np.load(corpus.out / "weights.npy")
    assert weights.dtype == np.float64 and np.array_equal(weights, expected)


def test_idx_files_equal_dalis_wds2idx(corpus: Corpus, tmp_path: Path) -> None:
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for shard in corpus.manifest["shards"]:
        ref = tmp_path / shard["index"]
        subprocess.run(
            [str(wds2idx), str(corpus.out / shard["name"]), str(ref)],
            check=True,
            capture_output=True,
        )
        assert (corpus.out / shard["index"]).read_bytes() == ref.read_bytes()


def test_dali_webdataset_reader_reads_and_decodes_every_sample(corpus: Corpus) -> None:
    from nvidia.dali import fn, pipeline_def, types

    shards = corpus.manifest["shards"]
    n = corpus.manifest["num_samples"]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def pipe():
        flac, labels, meta = fn.readers.webdataset(
            paths=[str(corpus.out / s["name"]) for s in shards],
            index_paths=[str(corpus.out / s["index"]) for s in shards],
            ext=["flac", "labels", "json"],
            dtypes=[types.UINT8, types.FLOAT, types.UINT8],
            missing_component_behavior="error",
            name="reader",
        )
        audio, rate = fn.decoders.audio(flac, dtype=types.INT16, downmix=True)
        return audio, rate, labels, meta

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    got = []
    while len(got) < n:
        audio, rate, labels, meta = p.run()
        for i in range(len(audio)):
            got.append(
                (
                    np.array(audio[i]),
                    float(np.array(rate[i])),
                    np.array(labels[i]),
                    json.loads(np.array(meta[i]).tobytes()),
                )
            )
    samples = _samples(corpus.out)
    assert [g[3]["key"] for g in got[:n]] == list(samples)
    for wave, rate, labels, record in got[:n]:
        ref, _ = sf.read(io.BytesIO(samples[record["key"]]["flac"]), dtype="int16")
        assert rate == 16000 and np.array_equal(wave.reshape(-1), ref)
        assert labels.shape == (527,) and sorted(np.flatnonzero(labels)) == sorted(record["labels"])


def test_webdataset_reads_every_sample(corpus: Corpus) -> None:
    import webdataset as wds

    urls = [str(corpus.out / s["name"]) for s in corpus.manifest["shards"]]
    rows = list(
        wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "flac", "json", "labels")
    )
    assert [r[0] for r in rows] == list(_samples(corpus.out))
    for _, flac, meta, _labels in rows:
        assert sf.info(io.BytesIO(flac)).samplerate == 16000 and json.loads(meta)["labels"]


def test_verify_passes_then_names_each_problem(corpus: Corpus, tmp_path: Path) -> None:
    assert verify(str(corpus.out)) == []
    bad = tmp_path / "bad"
    shutil.copytree(corpus.out, bad)
    first = corpus.manifest["shards"][0]
    # corrupt the FLAC payload of the first sample (keep the tar structure intact)
    idx_line = (bad / first["index"]).read_text().splitlines()[1].split()
    offset, name = int(idx_line[1]), idx_line[3]
    data = bytearray((bad / first["name"]).read_bytes())
    data[offset + 100 : offset + 400] = bytes(300)
    (bad / first["name"]).write_bytes(bytes(data))
    (bad / corpus.manifest["shards"][1]["index"]).write_text("v1.2 0\n")
    (bad / corpus.manifest["shards"][2]["name"]).unlink()
    np.save(bad / "weights.npy", np.ones(3))
    problems = verify(str(bad))
    text = "\n".join(problems)
    key = name.split(".")[0]
    assert f"{first['name']}: sha256" in text
    assert f"{first['name']}: key {key}: flac" in text
    assert f"{corpus.manifest['shards'][1]['index']}: does not match" in text
    assert f"{corpus.manifest['shards'][2]['name']}: file missing" in text
    assert "weights.npy" in text
    cli = subprocess.run(
        [sys.executable, "-m", "cmkd_scale.prep", "verify", "--out", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert cli.returncode == 1 and f"key {key}: flac" in cli.stdout


def test_memory_url_output_with_progress_lines(tmp_path: Path, caplog) -> None:
    import fsspec

    audio = tmp_path / "audio"
    write_audio(audio / "memclip0001.wav", tone(440.0, 1.0, 16000), 16000)
    write_audio(audio / "memclip0002.ogg", tone(660.0, 1.0, 22050, channels=2), 22050)
    csv_path = write_segments_csv(
        tmp_path / "s.csv", [("memclip0001", 0, 1, [SPEECH]), ("memclip0002", 0, 1, [DOG, MUSIC])]
    )
    url = "memory://prep_test/out"
    with caplog.at_level(logging.INFO, logger="cmkd_scale.prep"):
        manifest = run_prep(
            [csv_path], bundled_class_labels(), audio, url, shard_size=1, progress_every_s=0
        )
    progress = [r.getMessage() for r in caplog.records if "clips/s" in r.getMessage()]
    assert len(progress) >= 2 and "1/2 segments" in progress[0] and "ETA" in progress[0]
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/prep_test/out", detail=False))
    assert "manifest.json" in names and "shard-000001.tar" in names
    assert not [n for n in names if n.startswith(".")]  # no temp files left behind
    assert manifest["num_samples"] == 2 and verify(url) == []
    fs.rm("/prep_test", recursive=True)


def test_unknown_mid_without_skip_is_an_error_naming_the_line(tmp_path: Path) -> None:
    csv_path = write_segments_csv(
        tmp_path / "s.csv", [("okclip00001", 0, 1, [SPEECH]), ("badmid00001", 0, 1, ["/m/nope"])]
    )
    (tmp_path / "audio").mkdir()
    with pytest.raises(SegmentsError, match=r"s\.csv:5: unknown MID '/m/nope'"):
        run_prep([csv_path], bundled_class_labels(), tmp_path / "audio", str(tmp_path / "out"))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmkd_scale.prep",
            "--segments",
            str(csv_path),
            "--class-labels",
            str(bundled_class_labels()),
            "--audio-dir",
            str(tmp_path / "audio"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert cli.returncode == 2 and "s.csv:5: unknown MID '/m/nope'" in cli.stderr
    assert "--skip-bad-lines" in cli.stderr
