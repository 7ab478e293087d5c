"""`python -m cmkd_scale.weights fetch`, then runs with HF_HUB_OFFLINE=1 (no hub here).

The test builds the Hugging Face cache a login node's fetch would leave (huggingface_hub's
layout: models--<owner>--<name>/refs/main + snapshots/<commit>/<files>) with a timm
ImageNet repo (timm/tf_efficientnet_b0.aa_in1k: model.safetensors) and a transformers AST
(save_pretrained), then: fetch finds both offline; a 1-rank training run with
HF_HUB_OFFLINE=1 starts its CNN student from the cached ImageNet weights and distills from the
cached AST; with an empty cache both fail naming the fetch command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from tests.fixtures.train import NUM_CLASSES, ROOT, train_args, train_env
from tests.models.test_hf_ast import save_hf_ast

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMM_TAG = "timm:tf_efficientnet_b0.aa_in1k"
OVERRIDES = (
    "model.arch=efficientnet",
    "model.name=efficientnet_b0",
    "model.pooling=mean",
    f"model.imagenet_weights={TIMM_TAG}",
    "teacher.arch=ast",
    "teacher.checkpoint=hf:fake-org/ast-tiny",
    "teacher.dtype=fp32",
    "run.max_steps=2",
    "run.epochs=1",
)


def cache_repo(hub: Path, repo_id: str, source: Path) -> Path:
    """Place ``source``'s files as the cached snapshot of ``repo_id`` at revision main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_home")
    hub = root / "hub"
    imagenet = root / "timm_src"
    imagenet.mkdir()
    state = timm.create_model("tf_efficientnet_b0", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(imagenet / "model.safetensors"))
    cache_repo(hub, "timm/tf_efficientnet_b0.aa_in1k", imagenet)
    save_hf_ast(root / "ast_src", num_labels=NUM_CLASSES, frames=128, seed=3)
    cache_repo(hub, "fake-org/ast-tiny", root / "ast_src")
    return root


def _offline(hf_home: Path) -> dict[str, str]:
    return train_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")


def _fetch(run_dir: Path, data: dict[str, Path], env: dict[str, str]):
    cmd = [sys.executable, "-m", "cmkd_scale.weights", "fetch"]
    cmd += train_args(run_dir, data, *OVERRIDES)[2:]  # --config CONFIG overrides...
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


STEM_CHECK = """
import sys, torch
from safetensors.torch import load_file
from cmkd_scale.config import ModelConfig
from cmkd_scale.models import build_model
cfg = ModelConfig(arch="efficientnet", name="efficientnet_b0", imagenet_weights="{tag}")
model = build_model(cfg, num_classes=4, input_tdim=64)
cached = load_file(sys.argv[1])["conv_stem.weight"].sum(1, keepdim=True)
assert torch.equal(model.effnet.conv_stem.weight, cached), "stem not from the cache"
print("stem from the cache")
"""


@pytest.mark.slow
def test_fetch_then_an_offline_run(hf_home: Path, data: dict[str, Path], tmp_path: Path) -> None:
    env = _offline(hf_home)
    fetched = _fetch(tmp_path / "run", data, env)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr[-3000:]
    assert "ok      model.imagenet_weights: tf_efficientnet_b0.aa_in1k" in fetched.stdout
    assert "ok      teacher.checkpoint: hf:fake-org/ast-tiny" in fetched.stdout
    assert "HF_HUB_OFFLINE=1" in fetched.stdout

    weights = next(hf_home.glob("hub/models--timm--*/snapshots/*/model.safetensors"))
    check = subprocess.run(
        [sys.executable, "-c", STEM_CHECK.format(tag=TIMM_TAG), str(weights)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]

    run = subprocess.run(
        [sys.executable, *train_args(tmp_path / "run", data, *OVERRIDES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    assert "teacher input adapted exactly" in run.stderr  # the AST's own normalisation
    assert (tmp_path / "run" / "models" / "final.pt").is_file()


def test_an_empty_cache_names_the_fetch_command(data: dict[str, Path], tmp_path: Path) -> None:
    env = _offline(tmp_path / "empty_hf_home")
    fetched = _fetch(tmp_path / "run", data, env)
    assert fetched.returncode == 1
    assert "MISSING model.imagenet_weights=timm:tf_efficientnet_b0.aa_in1k" in fetched.stdout
    assert "MISSING teacher.checkpoint=hf:fake-org/ast-tiny" in fetched.stdout
    build = subprocess.run(
        [sys.executable, "-c", STEM_CHECK.format(tag=TIMM_TAG), "unused"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode != 0
    assert "WeightsMissingError" in build.stderr
    assert "python -m cmkd_scale.weights fetch --config" in build.stderr


def test_evaluate_scores_a_transformers_checkpoint(
    hf_home: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """`evaluate --checkpoint hf:<id>` (offline, from the cache) with the model's own settings."""
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "cmkd_scale.evaluate",
        "--checkpoint",
        "hf:fake-org/ast-tiny",
        "--out",
        str(out),
        "--name",
        "hf_ast",
        f"data.eval={data['eval']}",
        "data.device=cpu",
        "data.num_threads=1",
        "deepspeed.micro_batch=4",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_offline(hf_home), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "hf_ast_summary.json").read_text())
    assert 0.0 <= summary["mAP"] <= 1.0
    assert "sound 0" in (out / "hf_ast_class_ap.csv").read_text()  # its id2label names
