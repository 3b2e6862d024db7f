"""``python -m reir``: the same as the ``reir`` command."""

import sys

from .cli import main

sys.exit(main())
