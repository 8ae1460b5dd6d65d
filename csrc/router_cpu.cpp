// MoE router, CPU. See csrc/README.md for the contract; kcap/models/router.py is the
// Python wrapper that validates inputs and allocates every output with torch.
//
// One pass over the logits, parallel over tokens (OpenMP when compiled with it):
// softmax in fp32, top-k by logit (ties to the lower expert id), gates, z-loss and the mean
// probability per expert. Then a sequential pass in (choice rank, token) order assigns
// capacity slots, and a stable counting sort by expert builds the permutation, its
// inverse and the block-padded permutation for the grouped GEMM.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

enum Status : int { OK = 0, NON_FINITE = 1, BAD_ARGS = 2 };

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float load(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return static_cast<const float*>(base)[i];
    case 1: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

// dtype: 0 float32, 1 float16, 2 bfloat16. capacity < 0 means dropless.
// Outputs (caller-allocated): expert, gate, dropped: T*k; prob_sum: E (float64 sums of
// probabilities); counts: E; offsets: E+1; perm: T*k (first n_kept used); inverse: T*k;
// padded_perm: T*k + E*(block-1); block_expert: that / block; scalars: [z_loss_sum,
// n_kept, n_padded, n_blocks] as float64.
int route(uintptr_t logits_ptr, int dtype, int64_t T, int64_t E, int64_t k, int64_t capacity,
          int64_t block, uintptr_t expert_ptr, uintptr_t gate_ptr, uintptr_t dropped_ptr,
          uintptr_t prob_sum_ptr, uintptr_t counts_ptr, uintptr_t offsets_ptr,
          uintptr_t perm_ptr, uintptr_t inverse_ptr, uintptr_t padded_ptr,
          uintptr_t block_expert_ptr, uintptr_t scalars_ptr, int threads) {
  if (T < 0 || E < 1 || k < 1 || k > E || block < 1 || dtype < 0 || dtype > 2) return BAD_ARGS;
  const void* logits = reinterpret_cast<const void*>(logits_ptr);
  auto* expert = reinterpret_cast<int64_t*>(expert_ptr);
  auto* gate = reinterpret_cast<float*>(gate_ptr);
  auto* dropped = reinterpret_cast<uint8_t*>(dropped_ptr);
  auto* prob_sum = reinterpret_cast<double*>(prob_sum_ptr);
  auto* counts = reinterpret_cast<int64_t*>(counts_ptr);
  auto* offsets = reinterpret_cast<int64_t*>(offsets_ptr);
  auto* perm = reinterpret_cast<int64_t*>(perm_ptr);
  auto* inverse = reinterpret_cast<int64_t*>(inverse_ptr);
  auto* padded = reinterpret_cast<int64_t*>(padded_ptr);
  auto* block_expert = reinterpret_cast<int64_t*>(block_expert_ptr);
  auto* scalars = reinterpret_cast<double*>(scalars_ptr);

  int non_finite = 0;
  double z_sum = 0.0;
  std::vector<double> probs_total(E, 0.0);
  {
    py::gil_scoped_release release;  // pure C++ from here on
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#pragma omp parallel reduction(+ : z_sum) reduction(| : non_finite)
#endif
    {
      std::vector<float> p(E), v(E);
      std::vector<double> local(E, 0.0);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t t = 0; t < T; ++t) {
        float mx = -INFINITY;
        for (int64_t e = 0; e < E; ++e) {
          const float x = load(logits, dtype, t * E + e);
          if (!std::isfinite(x)) non_finite = 1;
          v[e] = p[e] = x;
          mx = x > mx ? x : mx;
        }
        double sum = 0.0;
        for (int64_t e = 0; e < E; ++e) {
          p[e] = std::exp(p[e] - mx);
          sum += p[e];
        }
        const double lse = mx + std::log(sum);
        z_sum += lse * lse;
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t e = 0; e < E; ++e) {
          p[e] *= inv;
          local[e] += p[e];
        }
        // top-k by logit (the order of the probabilities, without their rounding), ties to
        // the lower id: the scan keeps the first maximum.
        float picked_sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e) {
            bool taken = false;
            for (int64_t i = 0; i < j; ++i) taken |= expert[t * k + i] == e;
            if (!taken && (best < 0 || v[e] > v[best])) best = e;
          }
          expert[t * k + j] = best;
          gate[t * k + j] = p[best];
          picked_sum += p[best];
        }
        if (k > 1) {
          for (int64_t j = 0; j < k; ++j) gate[t * k + j] /= picked_sum;
        }
      }
#ifdef _OPENMP
#pragma omp critical
#endif
      for (int64_t e = 0; e < E; ++e) probs_total[e] += local[e];
    }
  }
  if (non_finite) return NON_FINITE;

  // Capacity slots in (choice rank, token) order: all first choices before second ones.
  const int64_t limit = capacity < 0 ? T * k : capacity;
  std::vector<int64_t> filled(E, 0);
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = t * k + j;
      const int64_t e = expert[s];
      const bool keep = filled[e]++ < limit;
      dropped[s] = keep ? 0 : 1;
      counts[e] += keep;
    }
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  // Stable counting sort of kept slots by expert (slot order t * k + j within an expert).
  std::vector<int64_t> cursor(offsets, offsets + E);
  for (int64_t s = 0; s < T * k; ++s) {
    if (dropped[s]) {
      inverse[s] = -1;
      continue;
    }
    const int64_t pos = cursor[expert[s]]++;
    perm[pos] = s;
    inverse[s] = pos;
  }
  // Block-padded variant: each expert's run rounded up to whole blocks; -1 marks padding.
  int64_t n_padded = 0, n_blocks = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = counts[e];
    const int64_t blocks = (c + block - 1) / block;
    for (int64_t i = 0; i < blocks * block; ++i) padded[n_padded + i] = i < c ? perm[offsets[e] + i] : -1;
    for (int64_t b = 0; b < blocks; ++b) block_expert[n_blocks + b] = e;
    n_padded += blocks * block;
    n_blocks += blocks;
  }
  for (int64_t e = 0; e < E; ++e) prob_sum[e] = probs_total[e];
  scalars[0] = z_sum;
  scalars[1] = static_cast<double>(offsets[E]);
  scalars[2] = static_cast<double>(n_padded);
  scalars[3] = static_cast<double>(n_blocks);
  return OK;
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_router_cpu, m) {
  m.doc() = "kcap MoE router (CPU). Use kcap.models.router.route, which validates inputs.";
  m.def("route", &route, "Route tokens; raw pointers to caller-allocated buffers. Returns a status.");
  m.def("has_openmp", &has_openmp);
  m.attr("OK") = static_cast<int>(OK);
  m.attr("NON_FINITE") = static_cast<int>(NON_FINITE);
  m.attr("BAD_ARGS") = static_cast<int>(BAD_ARGS);
}
