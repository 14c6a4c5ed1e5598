"""``python -m edgernn``: the `edgernn` command without the installed script (see `edgernn.cli`)."""

import sys

from .cli import main

sys.exit(main())
