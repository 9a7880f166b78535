// The float64 roundings up of the sound test (gloro_fast/sound/rounding.py and
// gloro_fast.sound.decision.ROUNDING), shared by the CPU kernels that must give the bits of
// their torch-op references (sound_decision, norm_basis).
//
// Include it after the other headers: it turns off the contraction of a*b + c into a fused
// multiply-add for the rest of the file, since the references round every product first.
#pragma once

#include <cmath>
#include <limits>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace gloro_fast {
namespace rounding {

constexpr double kUp = 1.0 + 0x1p-50;    // the relative term of a rounding up
constexpr double kDown = 1.0 - 0x1p-50;  // ... of a rounding down
constexpr double kUlp = 0x1p-50;         // the relative term of a signed rounding up
constexpr double kEta = 0x1p-1022;       // the absolute term: the smallest normal float64
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// up_tensor_inner: x (1 + 2^-50) + 2^-1022, the product rounded first
inline double up_inner(double x) {
  const double scaled = x * kUp;
  return scaled + kEta;
}

// up / up_tensor: up_inner with NaN -> +inf (failing closed)
inline double up(double x) {
  const double y = up_inner(x);
  return std::isnan(y) ? kInf : y;
}

// up_signed_with: x + (|x| 2^-50 + 2^-1022), for a value of any sign
inline double up_signed(double x) {
  double a = std::fabs(x) * kUlp;
  a = a + kEta;
  return x + a;
}

}  // namespace rounding
}  // namespace gloro_fast
