"""The demo (``python -m cmkd_scale.demo``, __main__.py) and the synthetic AudioSet-format clips it,
the tests and the benchmarks use (synth.py)."""
