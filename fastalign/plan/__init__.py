"""`python -m fastalign.plan`: will a training run fit, and how long will it take? Per-rank memory
from the trainer's own sharding (memory.py), token counts from its batcher (workload.py), the command
line, time estimate and report (planner.py). docs/design.md and planner.py's docstring tell the story."""
