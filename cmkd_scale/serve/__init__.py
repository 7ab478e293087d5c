"""Serving exported students: inference on audio files (infer.py, ``python -m cmkd_scale.infer``)
and ONNX export with an output check (onnx_export.py, ``python -m cmkd_scale.export``)."""
