"""``python -m fastmlp``: the same as the ``fastmlp`` command."""

import sys

from fastmlp.cli import main

sys.exit(main())
