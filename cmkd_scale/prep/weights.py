"""AST's balanced-sampling weights (egs/audioset/gen_weight_file.py in YuanGongND/ast).

Class weight = 1000 / (count + 0.01) with counts over the clips of the split (here: the clips
that made it into the shards); a clip's weight is the sum of its labels' class weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_counts(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """How many clips carry each class (int64 [C])."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for clip in labels:
        counts[list(clip)] += 1
    return counts


def sample_weights(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """float64 [N] per-clip weights in the order of ``labels``."""
    class_weight = (1000.0 / (class_counts(labels, num_classes) + 0.01)).tolist()
    weights = np.zeros(len(labels), dtype=np.float64)
    for i, clip in enumerate(labels):
        for label in clip:  # summed in label order, as AST does
            weights[i] += class_weight[label]
    return weights
