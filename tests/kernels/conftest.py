"""Runs the Triton kernels on CPU through the Triton interpreter.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so the variable must be
set before ``kernels`` is imported; modules of ``kernels`` that another test package imported earlier in this
session are dropped so that the tests below import interpreted ones.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
    del sys.modules[_name]
