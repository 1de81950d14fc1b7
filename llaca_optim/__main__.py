"""``python -m llaca_optim``: see llaca_optim/cli.py."""

import sys

from .cli import main

sys.exit(main())
