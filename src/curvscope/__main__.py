"""``python -m curvscope``."""

import sys

from curvscope.cli import main

sys.exit(main())
