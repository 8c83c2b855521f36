"""``python -m ekko.cli``: the same as the ``ekko`` command."""

import sys

from ekko.cli.main import main

sys.exit(main())
