"""``python -m finderpartner.cli``: the same as the ``finderpartner`` command."""

import sys

from . import main

sys.exit(main())
