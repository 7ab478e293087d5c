"""``python -m cmkd_scale.export``: export a trained student to ONNX (serve/onnx_export.py)."""

import sys

from cmkd_scale.serve.onnx_export import main

if __name__ == "__main__":
    sys.exit(main())
