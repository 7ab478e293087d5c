"""Distillation: the CMKD loss (loss.py) and the frozen teacher beside the DeepSpeed engine
(teacher.py)."""
