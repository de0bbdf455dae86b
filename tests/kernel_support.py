"""What the three kernel test files share: the device they run on and the marks every kernel test carries.

Kernels run in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1 before triton is imported)
or compiled on a GPU when there is one; outputs start as NaN, so an element a kernel forgets to write fails.
"""

import pytest
import torch

from kernels import _utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNEL_TEST = [
    pytest.mark.skipif(DEVICE == "cpu" and not _utils.interpreter_active(),
                       reason="Triton's interpreter is off: run with TRITON_INTERPRET=1 set before triton is imported"),
    pytest.mark.usefixtures("poisoned_outputs"),
]
