"""``python -m xai_audit.report summarize|report ...`` (the same as ``xai-audit``'s)."""

import sys

from xai_audit.report.cli import main

sys.exit(main())
