"""`python -m graceful_http` is the same as the `graceful-http` command."""

import sys

from graceful_http.cli import main

sys.exit(main())
