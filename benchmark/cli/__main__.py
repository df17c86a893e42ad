"""``python -m lesionbench.cli`` is the ``lesionbench`` command."""

import sys

from lesionbench.cli import main

sys.exit(main())
