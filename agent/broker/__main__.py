"""``python -m agent.broker``: run the embedded broker until SIGINT or SIGTERM."""

import sys

from agent.broker.cli import main

sys.exit(main())
