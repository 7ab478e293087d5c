"""Features CLI (``python -m cmkd_scale.features --raw``) versus torchaudio's kaldi.fbank.

Makes a few synthetic 10 s clips into shards with the real prep, runs the features command
on the chosen device, and compares every clip's log-mel with the reference (AST's way: decode
the same FLAC, ``kaldi.fbank``). Writes the worst absolute difference as JSON.

    python bench/_feature_parity.py --device gpu --out parity.json [--clips 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

from cmkd_scale.data.manifest import ShardSet
from cmkd_scale.data.members import MemberReader
from cmkd_scale.data.reference import decode, kaldi_fbank

TOLERANCE = 0.05  # target: GPU features within 0.05 of kaldi.fbank


def compare(shards: Path, npz: Path) -> dict[str, float | int]:
    """Max |features - kaldi.fbank| over all clips, and the clip count."""
    reader = MemberReader(ShardSet(str(shards)))
    keys = list(reader.table.keys)
    worst, clips = 0.0, 0
    with np.load(npz) as features:
        if sorted(features.files) != sorted(keys):
            raise RuntimeError(f"{npz} has keys {sorted(features.files)}, shards have {keys}")
        for i, key in enumerate(keys):
            ref = kaldi_fbank(decode(reader.read(i).flac)).numpy()
            ours = features[key]
            if ours.shape != ref.shape:
                raise RuntimeError(f"{key}: features {ours.shape} vs kaldi.fbank {ref.shape}")
            worst = max(worst, float(np.abs(ours - ref).max()))
            clips += 1
    reader.close()
    return {"max_abs_diff": worst, "clips": clips}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--clip-s", type=float, default=10.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="parity_") as tmp:
        shards = _common.make_shards(Path(tmp), clips=args.clips, duration_s=args.clip_s)
        npz = Path(tmp) / "features.npz"
        cmd = [sys.executable, "-m", "cmkd_scale.features", "--shards", str(shards),
               "--out", str(npz), "--raw", "--device", args.device]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=_common.ROOT)
        seconds = time.perf_counter() - t0
        result = {
            "device": args.device,
            "command": " ".join(cmd[1:]),
            "clip_s": args.clip_s,
            "features_cli_s": round(seconds, 2),
            "tolerance": TOLERANCE,
            **compare(shards, npz),
        }
    result["pass"] = result["max_abs_diff"] <= TOLERANCE
    _common.write_json(args.out, result)
    print(
        f"features --device {args.device} vs kaldi.fbank: max |diff| "
        f"{result['max_abs_diff']:.4f} over {result['clips']} clips (tolerance {TOLERANCE})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
