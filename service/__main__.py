"""``python -m service``: see :mod:`service.cli`."""

import sys

from service.cli.main import main

sys.exit(main())
