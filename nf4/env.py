"""Settings read once from the environment, at import.

`TRITON_INTERPRET=1` runs the Triton kernels through Triton's CPU interpreter (and CPU tensors take the
kernels instead of the torch reference). Triton reads it when first imported, so set it before `nf4`.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
