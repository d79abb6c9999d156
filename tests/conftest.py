import os

# Idle OpenMP threads that spin while they wait make small torch ops many times slower when
# the machine's cores are shared (other test processes, CI neighbours). Must be set before torch
# is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Triton kernels run in its interpreter on machines without a GPU. Triton reads this variable
# once, when it is first imported (possibly by another test's imports), so it is set here.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
