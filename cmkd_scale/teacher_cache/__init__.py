"""Teacher once, students many: the frozen teacher's logits of every (training sample, view),
computed in one pass (``python -m cmkd_scale.teacher_cache``) and read by every student trained
with ``teacher.cache`` (the format: distill/logit_cache.py)."""
