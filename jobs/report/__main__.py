"""``python -m jobs.report summarize|report ...`` (the same as ``xai-audit``'s)."""

import sys

from jobs.report.cli import main

sys.exit(main())
