// Turns a runtime bool that is constant for a whole launch into a compile-time constant, so the
// hot loops of a kernel are instantiated per case instead of branching per element (the pattern
// of FlashAttention's static_switch.h):
//   BOOL_SWITCH(P.cw != nullptr, kHasCw, [&] { kernel<kHasCw><<<grid, block>>>(P); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
