"""``python -m curvscope.cli``."""

import sys

from curvscope.cli import main

sys.exit(main())
