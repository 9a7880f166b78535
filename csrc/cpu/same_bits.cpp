// CPU kernel of gloro_fast::same_bits: whether a[i] and b[i] hold the same bits for every i.
//
// The stale-bound guard of certification compares every parameter with the copy its bounds
// were computed from, on every certify call; at::equal walks floating-point elements one by
// one (2.2 M float32 weights of 6C2F: about 1 ms on two cores). Bit equality is a byte
// comparison: memcmp over contiguous storage, the bytes split between threads, and every
// thread stops as soon as any difference is found. Pairs that differ in dtype or shape
// compare unequal; pairs laid out differently, or not dense, fall back to at::equal on
// integer views (bit equality too).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace gloro_fast {
namespace {

// An integer dtype of the same width: at::equal on it compares bits (NaN == NaN, -0 != +0).
at::ScalarType bits_type(at::ScalarType t) {
  switch (c10::elementSize(t)) {
    case 1: return at::kByte;
    case 2: return at::kShort;
    case 4: return at::kInt;
    default: return at::kLong;
  }
}

struct Span {
  const char* a;
  const char* b;
  int64_t bytes;
};

bool same_bits_cpu(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "same_bits: a and b must have the same length, got ", a.size(), " and ",
              b.size());
  std::vector<Span> spans;
  std::vector<int64_t> ends;  // ends[i]: bytes of spans [0, i]
  int64_t total = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "same_bits (CPU kernel): a[", i, "] and b[", i,
                "] must be CPU tensors, got ", x.device(), " and ", y.device());
    if (x.scalar_type() != y.scalar_type() || x.sizes() != y.sizes()) return false;
    if (x.numel() == 0) continue;
    // one span of numel elements from the data pointer on, laid out alike in both (contiguous
    // or channels_last weights and their snapshot): the bits are the bytes
    if (x.strides() == y.strides() && x.is_non_overlapping_and_dense()) {
      const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
      spans.push_back({static_cast<const char*>(x.const_data_ptr()), static_cast<const char*>(y.const_data_ptr()),
                       bytes});
      total += bytes;
      ends.push_back(total);
    } else if (!at::equal(x.view(bits_type(x.scalar_type())), y.view(bits_type(y.scalar_type())))) {
      return false;
    }
  }
  if (total == 0) return true;
  std::atomic<bool> same{true};
  // grain: 4 MiB per task: a small model (2C2F: 0.7 MB) compares on the calling thread, where
  // waking the other threads costs more than the comparison (2-core Xeon, 2C2F: 97 -> 27 us)
  at::parallel_for(0, total, int64_t{1} << 22, [&](int64_t begin, int64_t end) {
    size_t s = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    int64_t pos = begin;
    while (pos < end && s < spans.size() && same.load(std::memory_order_relaxed)) {
      const int64_t start = ends[s] - spans[s].bytes;
      const int64_t offset = pos - start;
      const int64_t len = std::min(end, ends[s]) - pos;
      // 64 KiB pieces: a difference found by another thread stops this one soon
      for (int64_t done = 0; done < len; done += int64_t{1} << 16) {
        const int64_t piece = std::min<int64_t>(int64_t{1} << 16, len - done);
        if (std::memcmp(spans[s].a + offset + done, spans[s].b + offset + done, static_cast<size_t>(piece)) != 0) {
          same.store(false, std::memory_order_relaxed);
          return;
        }
        if (!same.load(std::memory_order_relaxed)) return;
      }
      pos += len;
      ++s;
    }
  });
  return same.load();
}

}  // namespace
}  // namespace gloro_fast

TORCH_LIBRARY_IMPL(_gloro_fast_cpp, CPU, m) { m.impl("same_bits", &gloro_fast::same_bits_cpu); }
