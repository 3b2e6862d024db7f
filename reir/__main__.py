"""``python -m reir``: the same as the ``reir`` command."""

import sys

from reir.cli import main

sys.exit(main())
