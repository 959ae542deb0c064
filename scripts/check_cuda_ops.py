"""Exit 0 when the installed gdc_ext registers a CUDA kernel for every op, else 1 naming the
missing ones. Run from outside the source tree (e.g. `cd /tmp`) so the installed package is
imported, not python/ of the checkout. Used by cuda_check.sh (no GPU needed) and gpu_session.sh."""
import sys

import torch

import gdc_ext

OPS = ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "scale_grad_", "end_epoch_", "linear_cross_entropy_fwd"]
missing = [o for o in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key("gdc::" + o, "CUDA")]
if missing:
    print(f"no CUDA kernel registered for {missing} (gdc_ext {gdc_ext.__version__}, torch {torch.__version__})")
    sys.exit(1)
print(f"OK: gdc_ext {gdc_ext.__version__} imports with torch {torch.__version__}; CUDA kernels registered for {OPS}")
