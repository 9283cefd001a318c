"""``python -m nexa.cli``: the same as the ``nexa`` command."""

import sys

from nexa.cli.main import main

sys.exit(main())
