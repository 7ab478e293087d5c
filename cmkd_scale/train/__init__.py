"""Training: the loop (trainer.py), the DeepSpeed engine (engine.py, the only module that imports
``deepspeed``), checkpoints, the learning-rate schedule, step metrics and in-training evaluation.

``python -m cmkd_scale.train`` runs __main__.py. Nothing is imported here, so that the command
notes preemption signals before its heavy imports.
"""
