"""``python -m cmkd_scale.tracking upload --run-dir DIR [--uri URI]``: send a run's journal."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmkd_scale.tracking upload --run-dir DIR [--uri URI]``."""
    from cmkd_scale.tracking.upload import main as upload_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "upload":
        print("usage: python -m cmkd_scale.tracking upload --run-dir DIR [--uri URI]")
        return 2
    return upload_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
