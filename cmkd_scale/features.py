"""``python -m cmkd_scale.features``: features and norm stats of a shard set (data/features.py)."""

import sys

from cmkd_scale.data.features import main

if __name__ == "__main__":
    sys.exit(main())
