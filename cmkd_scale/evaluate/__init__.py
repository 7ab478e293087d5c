"""Evaluation: scoring (predict, gather across ranks, AudioSet mAP/mAUC/d'), metrics, weight
averaging; ``python -m cmkd_scale.evaluate`` on exported students (__main__.py)."""
