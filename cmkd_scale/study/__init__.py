"""The CMKD grid on one dataset: baselines, cross-model and same-family KD, N seeds, one table.

``python -m cmkd_scale.study --config configs/study_X.yaml`` (see :mod:`cmkd_scale.study.cli`);
the demo (``make demo``) is a one-seed study on synthetic data.
"""
