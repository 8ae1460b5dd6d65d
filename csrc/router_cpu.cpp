// MoE router, CPU. See csrc/README.md for the contract; kcap/models/router.py is the
// Python wrapper that validates inputs, allocates every output with torch and passes
// zero-copy numpy views of them.
//
// The module checks every argument itself before touching memory (item type, C-contiguity,
// writability, enough elements for T, E, k, block, no two buffers overlapping): a wrong call
// is a TypeError or ValueError, never a crash.
//
// One pass over the logits, parallel over tokens (OpenMP when compiled with it):
// softmax in fp32, top-k by logit (ties to the lower expert id), gates, z-loss and the mean
// probability per expert. Then a sequential pass in (choice rank, token) order assigns
// capacity slots, and a stable counting sort by expert builds the permutation, its
// inverse and the block-padded permutation for the grouped GEMM.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#define KCAP_WHO "kcap._router_cpu.route: "
#include "arg_errors.h"

#ifdef _OPENMP
#include <omp.h>
#include <unistd.h>
#endif

namespace py = pybind11;

namespace {

enum Status : int { OK = 0, NON_FINITE = 1 };

// More threads than cores never helps this compute-bound loop, and an absurd request would
// make libgomp abort the whole process while creating them.
constexpr int64_t kMaxThreads = 256;

#ifdef _OPENMP
// libgomp's thread pool does not survive fork(): a child that enters a parallel region
// waits forever for pool threads that were not copied. A process other than the one that
// loaded this module is such a child, so it routes serially (if(false): no pool is used).
pid_t loaded_in = 0;
#endif

// An element type: the buffer-protocol (struct module) codes accepted for it and its size.
struct Kind {
  const char* name;
  const char* codes;
  Py_ssize_t itemsize;
};
constexpr Kind kFloat32{"float32", "f", 4};
constexpr Kind kFloat16{"float16", "e", 2};
constexpr Kind kBf16Bits{"16-bit integer (bfloat16 bits; numpy has no bfloat16)", "hH", 2};
constexpr Kind kInt64{"int64", "lq", 8};
constexpr Kind kUint8{"uint8", "B", 1};
constexpr Kind kFloat64{"float64", "d", 8};

bool format_matches(const char* format, const Kind& kind) {
  std::string f = format ? format : "B";  // NULL means unsigned bytes
  const bool native_little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
  if (!f.empty() && (f[0] == '@' || f[0] == '=' || (f[0] == '<' && native_little))) f.erase(0, 1);
  return f.size() == 1 && std::strchr(kind.codes, f[0]) != nullptr;
}

// One argument's memory, checked and held (its buffer view released) for the whole call.
class Buffer {
 public:
  Buffer(const py::object& obj, const char* name, const Kind& kind, int64_t need, bool output)
      : name_(name) {
    if (!PyObject_CheckBuffer(obj.ptr()))
      bad_type(name_ + " must be a buffer of " + kind.name + " (e.g. tensor.numpy()), got " +
               Py_TYPE(obj.ptr())->tp_name);
    if (PyObject_GetBuffer(obj.ptr(), &view_.b, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      bad_type(name_ + " does not export a strided buffer with an item format");
    }
    view_.held = true;
    const Py_buffer& b = view_.b;
    if (!format_matches(b.format, kind) || b.itemsize != kind.itemsize)
      bad_type(name_ + " must hold " + kind.name + " items, got format '" +
               (b.format ? b.format : "B") + "' of " + std::to_string(b.itemsize) + " bytes");
    if (!PyBuffer_IsContiguous(&b, 'C')) bad_value(name_ + " must be C-contiguous");
    if (output && b.readonly) bad_value(name_ + " is read-only, but the router writes it");
    if (reinterpret_cast<uintptr_t>(b.buf) % kind.itemsize != 0)
      bad_value(name_ + " is not aligned to its item size");
    const int64_t items = static_cast<int64_t>(b.len / b.itemsize);
    if (items < need)
      bad_value(name_ + " holds " + std::to_string(items) + " items, needs at least " +
                std::to_string(need) + " for these T, E, k, block");
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  template <typename T>
  T* data() const { return static_cast<T*>(view_.b.buf); }
  const char* begin() const { return static_cast<const char*>(view_.b.buf); }
  const char* end() const { return begin() + view_.b.len; }
  const std::string& name() const { return name_; }

 private:
  // A member, so that the view is released even when the constructor throws.
  struct View {
    Py_buffer b{};
    bool held = false;
    ~View() {
      if (held) PyBuffer_Release(&b);
    }
  } view_;
  std::string name_;
};

// Overlapping outputs would let one write corrupt another (or the logits mid-read).
void check_disjoint(std::initializer_list<const Buffer*> all) {
  for (auto a = all.begin(); a != all.end(); ++a)
    for (auto b = a + 1; b != all.end(); ++b)
      if ((*a)->begin() < (*a)->end() && (*b)->begin() < (*b)->end() &&  // empty: no memory
          (*a)->begin() < (*b)->end() && (*b)->begin() < (*a)->end())
        bad_value((*a)->name() + " and " + (*b)->name() + " overlap in memory");
}

// Only another thread writing the outputs during the call gets here: indices read back are
// checked so that it cannot make this code write out of bounds.
[[noreturn]] void changed_under_us() {
  throw std::runtime_error(kWho + "expert/dropped changed while routing (written concurrently?)");
}

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

// dtype: 0 float32, 1 float16, 2 bfloat16 (its bits in a 16-bit integer buffer). capacity < 0
// means dropless. threads: 0 = OpenMP's default. Buffers (any C-contiguous buffer-protocol
// object, e.g. tensor.numpy(); item types as in router.py's _route_cpu): logits: T*E; expert,
// gate, dropped, perm, inverse: T*k (perm: first n_kept used); prob_sum (float64 sums of
// probabilities), counts: E; offsets: E+1; padded_perm: T*k + E*(block-1); block_expert:
// that / block; scalars: [z_loss_sum, n_kept, n_padded, n_blocks] as float64. Returns OK or
// NON_FINITE; a bad argument raises TypeError or ValueError before any memory is touched.
int route(const py::object& logits_obj, int dtype, int64_t T, int64_t E, int64_t k,
          int64_t capacity, int64_t block, const py::object& expert_obj,
          const py::object& gate_obj, const py::object& dropped_obj,
          const py::object& prob_sum_obj, const py::object& counts_obj,
          const py::object& offsets_obj, const py::object& perm_obj,
          const py::object& inverse_obj, const py::object& padded_obj,
          const py::object& block_expert_obj, const py::object& scalars_obj, int threads) {
  if (dtype < 0 || dtype > 2)
    bad_value("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  if (T < 0) bad_value("T must be >= 0, got " + std::to_string(T));
  if (E < 1) bad_value("E must be >= 1, got " + std::to_string(E));
  if (k < 1 || k > E)
    bad_value("k must be in [1, E=" + std::to_string(E) + "], got " + std::to_string(k));
  if (block < 1) bad_value("block must be >= 1, got " + std::to_string(block));
  if (threads < 0) bad_value("threads must be >= 0 (0: OpenMP's default), got " + std::to_string(threads));
  const int64_t n = mul(T, k);
  const int64_t max_padded = add(n, mul(E, block - 1));
  const Kind& logits_kind = dtype == 0 ? kFloat32 : (dtype == 1 ? kFloat16 : kBf16Bits);
  const Buffer logits_buf(logits_obj, "logits", logits_kind, mul(T, E), false);
  const Buffer expert_buf(expert_obj, "expert", kInt64, n, true);
  const Buffer gate_buf(gate_obj, "gate", kFloat32, n, true);
  const Buffer dropped_buf(dropped_obj, "dropped", kUint8, n, true);
  const Buffer prob_sum_buf(prob_sum_obj, "prob_sum", kFloat64, E, true);
  const Buffer counts_buf(counts_obj, "counts", kInt64, E, true);
  const Buffer offsets_buf(offsets_obj, "offsets", kInt64, add(E, 1), true);
  const Buffer perm_buf(perm_obj, "perm", kInt64, n, true);
  const Buffer inverse_buf(inverse_obj, "inverse", kInt64, n, true);
  const Buffer padded_buf(padded_obj, "padded_perm", kInt64, max_padded, true);
  const Buffer block_expert_buf(block_expert_obj, "block_expert", kInt64, max_padded / block, true);
  const Buffer scalars_buf(scalars_obj, "scalars", kFloat64, 4, true);
  check_disjoint({&logits_buf, &expert_buf, &gate_buf, &dropped_buf, &prob_sum_buf, &counts_buf,
                  &offsets_buf, &perm_buf, &inverse_buf, &padded_buf, &block_expert_buf,
                  &scalars_buf});
  const void* logits = logits_buf.data<const void>();
  auto* expert = expert_buf.data<int64_t>();
  auto* gate = gate_buf.data<float>();
  auto* dropped = dropped_buf.data<uint8_t>();
  auto* padded = padded_buf.data<int64_t>();
  auto* block_expert = block_expert_buf.data<int64_t>();

  int64_t team = 1;
#ifdef _OPENMP
  team = std::min({threads > 0 ? int64_t{threads} : int64_t{omp_get_max_threads()}, kMaxThreads,
                   std::max<int64_t>(T, 1)});
  if (getpid() != loaded_in) team = 1;  // a forked child: see loaded_in
#endif
  // Per-thread scratch, allocated here: an exception (bad_alloc) cannot leave a parallel region.
  // Each thread's rows are padded by a cache line (64 bytes) so that threads never share one.
  const int64_t row = add(E, 16);
  std::vector<float> p_all(mul(team, row)), v_all(mul(team, row));
  std::vector<double> local_all(mul(team, row), 0.0), z_part(team, 0.0);
  std::vector<int> bad_part(team, 0);
  {
    py::gil_scoped_release release;  // pure C++ from here on
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(team)) if (team > 1)
#endif
    {
#ifdef _OPENMP
      const int64_t id = omp_get_thread_num();
#else
      const int64_t id = 0;
#endif
      float* p = p_all.data() + id * row;
      float* v = v_all.data() + id * row;
      double* local = local_all.data() + id * row;
      double z_sum = 0.0;
      int non_finite = 0;
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
      z_part[id] = z_sum;
      bad_part[id] = non_finite;
    }
  }
  // Combined in thread order: the sums do not depend on which thread finishes first.
  double z_sum = 0.0;
  std::vector<double> probs_total(E, 0.0);
  for (int64_t id = 0; id < team; ++id) {
    if (bad_part[id]) return NON_FINITE;
    z_sum += z_part[id];
    for (int64_t e = 0; e < E; ++e) probs_total[e] += local_all[id * row + e];
  }

  // Capacity slots in (choice rank, token) order: all first choices before second ones.
  // counts and offsets are kept here, not read back from the outputs (see changed_under_us).
  const int64_t limit = capacity < 0 ? n : capacity;
  std::vector<int64_t> filled(E, 0), kept(E, 0);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = t * k + j;
      const int64_t e = expert[s];
      if (e < 0 || e >= E) changed_under_us();
      const bool keep = filled[e]++ < limit;
      dropped[s] = keep ? 0 : 1;
      kept[e] += keep;
    }
  }
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + kept[e];
  // Stable counting sort of kept slots by expert (slot order t * k + j within an expert).
  auto* perm = perm_buf.data<int64_t>();
  auto* inverse = inverse_buf.data<int64_t>();
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < n; ++s) {
    if (dropped[s]) {
      inverse[s] = -1;
      continue;
    }
    const int64_t e = expert[s];
    if (e < 0 || e >= E || cursor[e] >= start[e + 1]) changed_under_us();
    const int64_t pos = cursor[e]++;
    perm[pos] = s;
    inverse[s] = pos;
  }
  // Block-padded variant: each expert's run rounded up to whole blocks; -1 marks padding.
  // sum(ceil(kept / block) * block) <= T*k + E*(block-1), the size checked above.
  int64_t n_padded = 0, n_blocks = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = kept[e];
    const int64_t blocks = (c + block - 1) / block;
    for (int64_t i = 0; i < blocks * block; ++i) padded[n_padded + i] = i < c ? perm[start[e] + i] : -1;
    for (int64_t b = 0; b < blocks; ++b) block_expert[n_blocks + b] = e;
    n_padded += blocks * block;
    n_blocks += blocks;
  }
  auto* counts = counts_buf.data<int64_t>();
  auto* offsets = offsets_buf.data<int64_t>();
  auto* prob_sum = prob_sum_buf.data<double>();
  auto* scalars = scalars_buf.data<double>();
  for (int64_t e = 0; e < E; ++e) {
    counts[e] = kept[e];
    prob_sum[e] = probs_total[e];
  }
  for (int64_t e = 0; e <= E; ++e) offsets[e] = start[e];
  scalars[0] = z_sum;
  scalars[1] = static_cast<double>(start[E]);
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
#ifdef _OPENMP
  loaded_in = getpid();
#endif
  m.doc() = "kcap MoE router (CPU). Use kcap.models.router.route, which validates inputs.";
  m.def("route", &route, "Route tokens into caller-allocated buffers (checked here). Returns a status.",
        py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("k"),
        py::arg("capacity"), py::arg("block"), py::arg("expert"), py::arg("gate"),
        py::arg("dropped"), py::arg("prob_sum"), py::arg("counts"), py::arg("offsets"),
        py::arg("perm"), py::arg("inverse"), py::arg("padded_perm"), py::arg("block_expert"),
        py::arg("scalars"), py::arg("threads"));
  m.def("has_openmp", &has_openmp);
  m.attr("OK") = static_cast<int>(OK);
  m.attr("NON_FINITE") = static_cast<int>(NON_FINITE);
}
