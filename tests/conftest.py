import os

# Idle OpenMP threads that spin while they wait make small torch ops many times slower when
# the machine's cores are shared (other test processes, CI neighbours). Must be set before torch
# is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
