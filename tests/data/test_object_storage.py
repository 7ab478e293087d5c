"""Shards on real object storage: prep writes to an S3 server (moto's server mode on
127.0.0.1, tests/fixtures/s3.py), prep verify re-reads it, a 2-rank training and the evaluation
command read from it, and a read error or a server that goes away mid-read is reported like a
local corrupt shard (naming the shard), or skipped under data.corrupt_policy=skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cmkd_scale.config import DataConfig
from cmkd_scale.data.manifest import DataError, ShardSet
from tests.fixtures.s3 import s3_server
from tests.fixtures.train import ROOT, free_port, train_args, train_env

pytestmark = pytest.mark.slow

BUCKET = "cmkd-shards"
TRAIN = f"s3://{BUCKET}/audioset/train"
EVAL = f"s3://{BUCKET}/audioset/eval"


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """Synthetic AudioSet clips (4 classes present) and their segment CSVs."""
    from cmkd_scale.demo.synth import make_synthetic_audioset

    root = tmp_path_factory.mktemp("raw")
    return {
        split: make_synthetic_audioset(
            root / split, num_clips=n, num_classes_used=4, duration_s=1.5, seed=seed, split=split
        )
        for split, n, seed in (("train", 32, 0), ("eval", 15, 1))
    }


def _prep(ds, out: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "cmkd_scale.prep", "--segments", str(ds.segments_csv),
        "--class-labels", str(ds.class_labels_csv), "--audio-dir", str(ds.audio_dir),
        "--out", out, "--shard-size", "16", *extra,
    ]  # fmt: skip
    return _run(cmd, env)


@pytest.fixture(scope="module")
def s3(raw, tmp_path_factory):
    """One S3 server for the module, holding the train and eval sets written by prep."""
    import fsspec

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        fsspec.filesystem("s3").mkdir(BUCKET)
        env = train_env(**server.env)
        for split, url in (("train", TRAIN), ("eval", EVAL)):
            proc = _prep(raw[split], url, env)
            assert proc.returncode == 0, proc.stderr[-4000:]
        yield {"server": server, "env": env}


def test_prep_writes_the_shard_set_to_s3(s3, raw) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(TRAIN)}
    assert {"manifest.json", "weights.npy", "shard-000000.tar", "shard-000000.idx"} <= names
    assert not [n for n in names if n.endswith(".tmp")], names  # every file published
    shards = ShardSet(TRAIN)
    assert shards.num_samples == 32 and not shards.is_local and not shards.missing_shards
    assert len(shards.table) == 32
    # a rerun finds the output finished: nothing is written again
    before = {p: fs.info(p)["LastModified"] for p in fs.ls(TRAIN)}
    proc = _prep(raw["train"], TRAIN, s3["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    assert {p: fs.info(p)["LastModified"] for p in fs.ls(TRAIN)} == before


def test_prep_verify_reads_it_back(s3) -> None:
    proc = _run([sys.executable, "-m", "cmkd_scale.prep", "verify", "--out", TRAIN], s3["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_rank_training_and_evaluation_read_from_s3(s3, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**s3["env"], "CMKD_SHARD_CACHE": str(tmp_path / "cache")}
    data = {"train": TRAIN, "eval": EVAL}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        *train_args(run_dir, data, "teacher=none", "run.epochs=2"),  # type: ignore[arg-type]
    ]  # fmt: skip
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((run_dir / "eval" / "report_summary.json").read_text())
    assert 0.0 <= report["mAP"] <= 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 8  # 2 epochs x 32 clips / 8
    # the eval set was staged once under CMKD_SHARD_CACHE (DALI's reader opens local files)
    staged = list((tmp_path / "cache").glob("*/manifest.json"))
    assert len(staged) == 1

    out = tmp_path / "evaluate"
    checkpoint = run_dir / report["checkpoint"]
    evaluate = [sys.executable, "-m", "cmkd_scale.evaluate", "--checkpoint", str(checkpoint)]
    proc = _run([*evaluate, "--out", str(out), f"data.eval={EVAL}"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(next(out.glob("*summary.json")).read_text())
    assert summary["mAP"] == pytest.approx(report["mAP"], abs=1e-6)


def _loader(url: str, policy: str):
    from cmkd_scale.data.loader import TrainLoader

    cfg = DataConfig(train=url, corrupt_policy=policy, mixup=0.0, device="cpu")
    return TrainLoader(cfg, micro_batch=4, rank=0, world_size=1, seed=0, device="cpu")


def test_read_errors_and_a_server_gone_mid_read(s3, raw, tmp_path: Path) -> None:
    """On a server of its own: a shard deleted under a reader is skipped (skip) or named
    (error); the server stopped mid-read stops the reader with an error naming the shard."""
    import fsspec

    with s3_server(tmp_path / "s3b") as server:
        fs = fsspec.filesystem("s3")
        fs.mkdir("other")
        url = "s3://other/train"
        proc = _prep(raw["train"], url, train_env(**server.env))
        assert proc.returncode == 0, proc.stderr[-3000:]

        skip, error = _loader(url, "skip"), _loader(url, "error")
        table = skip.shards.table
        first = [i for i in range(len(table)) if table.shard[i] == 0]
        second = [i for i in range(len(table)) if table.shard[i] == 1]
        assert skip.source.readable(0, 0, 0, first[0]).index == first[0]

        fs.rm(f"{url}/shard-000001.tar")  # a read error: the object is gone
        with pytest.raises(DataError, match=r"shard-000001\.tar.*corrupt_policy=skip"):
            error.source.readable(0, 0, 0, second[0])
        stand_in = skip.source.readable(0, 0, 0, second[0])
        assert stand_in.shard == "shard-000000.tar" and skip.skipped >= 1

        server.stop()  # the server goes away mid-epoch
        for loader in (skip, error):
            with pytest.raises(DataError, match=r"shard-000000\.tar.*does not answer"):
                loader.source.readable(0, 1, 0, first[1])
