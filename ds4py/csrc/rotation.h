#ifndef DS4PY_ROTATION_H  // included by row_ops.h and attention.cpp, both in some libraries
#define DS4PY_ROTATION_H
#include <cmath>

// One rope channel pair (a, b), the complex number a + i b, times the rotation c + i s, in float32. Each part's
// first product is fused with the sum (one rounding less), written out with std::fma so that every build gives the
// same bits: these are the values GCC's contraction of a * c - b * s and a * s + b * c gives under -march=native,
// and a build without contraction (the portable kernels, -ffp-contract=off) would otherwise round both products.
inline void rotate_pair(float a, float b, float c, float s, float& re, float& im) {
  re = std::fma(a, c, -(b * s));
  im = std::fma(a, s, b * c);
}
#endif
