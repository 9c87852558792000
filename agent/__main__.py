"""``python -m agent``: the same as the ``appliance-agent`` script."""

import sys

from agent.cli import main

sys.exit(main())
