"""``python -m agent`` is the ``janus`` command."""

import sys

from agent.cli import main

sys.exit(main())
