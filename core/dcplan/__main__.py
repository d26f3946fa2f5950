"""``python -m dcplan``: the ``dcplan`` command line."""

import sys

from dcplan.cli.main import main

sys.exit(main())
