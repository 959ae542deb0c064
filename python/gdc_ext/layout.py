"""Column layout of the CartoState tensors, mirroring the C++ enums of csrc/epoch_math.h.

The kernels index the state by these columns; Python code that reads or writes a column (the
state's scores, the fallback recording, the fake implementations) uses these names, so a layout
change is one edit here and one in C++ (enums ``ACol``, ``FCol``, ``ICol``).
"""
from __future__ import annotations

__all__ = [
    "ACC_LOSS_SUM", "ACC_COUNT", "ACC_ENERGY_SUM", "ACC_COLS",
    "F_DIFF_SUM", "F_LAST", "F_MIN", "F_MEAN", "F_M2", "F_ENERGY", "F_COLS_BASE", "F_COLS_EXTRAS",
    "I_DIFF_COUNT", "I_OBSERVED", "I_TRANSITIONS", "I_COLS",
]

# acc [N, ACC_COLS] float64: this epoch's accumulator (enum ACol), zeroed by end_epoch.
ACC_LOSS_SUM = 0    # sum of the recorded token NLLs
ACC_COUNT = 1       # number of recorded tokens
ACC_ENERGY_SUM = 2  # sum of the tokens' logit-gradient energy ||softmax - onehot||^2
ACC_COLS = 3

# fstats [N, F_COLS_BASE or F_COLS_EXTRAS] float64: running statistics (enum FCol).
F_DIFF_SUM = 0      # sum of the per-epoch mean losses over burn-in epochs
F_LAST = 1          # per-epoch mean loss of the last observed epoch
F_MIN = 2           # (extras) lowest per-epoch mean loss
F_MEAN = 3          # (extras) Welford mean of the per-epoch mean losses
F_M2 = 4            # (extras) Welford sum of squared deviations
F_ENERGY = 5        # (extras) accumulated gradient energy
F_COLS_BASE = 2     # columns without extras
F_COLS_EXTRAS = 6   # columns with extras

# istats [N, I_COLS] int32: counters (enum ICol).
I_DIFF_COUNT = 0    # burn-in epochs in which the sample was observed
I_OBSERVED = 1      # epochs in which the sample was observed
I_TRANSITIONS = 2   # consecutive-observation pairs
I_COLS = 3
