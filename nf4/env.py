"""Settings read once, at import. `TRITON_INTERPRET=1` runs the Triton kernels in Triton's CPU
interpreter, for CPU tensors too; Triton reads it on first import, so set it before importing `nf4`.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
