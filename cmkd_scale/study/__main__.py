import sys

from cmkd_scale.study.cli import main

sys.exit(main())
