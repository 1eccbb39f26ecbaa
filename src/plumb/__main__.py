"""``python -m plumb`` (what ``torchrun -m plumb`` and ``plumb train --nproc`` start)."""

import sys

from plumb.cli import main

sys.exit(main())
