import os

# Idle OpenMP threads that spin while they wait make small torch ops many times slower when
# the machine's cores are shared (other test processes, CI neighbours). Must be set before torch
# is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Triton kernels run in its interpreter on machines without a GPU. Triton reads this variable
# once, when it is first imported (possibly by another test's imports), so it is set here.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after the environment variables above)


@pytest.fixture()
def one_thread():
    """Small models on a shared CPU: one torch thread avoids OpenMP spin-waiting, which makes
    small ops many times slower when the cores are shared. Test files that want it say
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
