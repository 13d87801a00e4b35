"""`python -m tcpproxy` is the same program as `tcpproxy`."""

from __future__ import annotations

import sys

from tcpproxy.cli import main

sys.exit(main())
