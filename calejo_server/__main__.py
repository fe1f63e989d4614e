"""``python -m calejo_server``: the ``calejo`` command."""

from __future__ import annotations

import sys

from calejo_server.cli import main

if __name__ == "__main__":
    sys.exit(main())
