"""`python -m fastalign.plan`: the planner's command line (fastalign/plan/planner.py)."""

import sys

from fastalign.cli import run_main
from fastalign.plan.planner import main

sys.exit(run_main(main))
