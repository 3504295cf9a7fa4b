"""Import the triton backend first: it decides, before Triton itself is
imported, whether Triton's library runs interpreted (no GPU) or compiled."""
import convdsl.triton  # noqa: F401

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_precision_flags():
    """Tests that switch TF32 on or off (the benchmark harness does) must not
    change what later tests compile: kernels read these global flags."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
