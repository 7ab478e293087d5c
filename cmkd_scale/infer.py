"""``python -m cmkd_scale.infer``: classify audio files with a trained student (serve/infer.py)."""

import sys

from cmkd_scale.serve.infer import main

if __name__ == "__main__":
    sys.exit(main())
