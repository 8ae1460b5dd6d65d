// MoE router, CUDA: the contract of kcap/models/router.py on the GPU, with no host-device
// synchronisation. Every kernel is launched on the caller's stream (torch's current
// stream, passed as an integer); all sizes the host does not know (kept slots, padded
// rows, blocks) stay on the device, and the variable-length outputs are allocated at
// their maximum size with -1 past their end.
//
// Steps: (1) one thread per token: fp32 softmax statistics, top-k by logit (ties to the
// lower id), gates, lse^2; (2) capacity in (choice rank, token) order: per-chunk expert
// histograms, a per-expert scan over chunks, then a sequential rank inside each chunk;
// (3) the same three passes in slot order (t * k + j) over kept slots give the stable
// expert-sorted permutation and its inverse; (4) the block-padded permutation and one
// expert id per block. Tokens with a non-finite logit have all their assignments dropped
// and are counted in status[0] (checking on the host would need a synchronisation).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define KCAP_WHO "kcap._router_cuda.route_cuda: "
#include "arg_errors.h"

namespace py = pybind11;

namespace {

constexpr int kChunk = 256;  // assignments ranked sequentially by one thread

__device__ inline float load(const void* base, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(base)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(base)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__global__ void topk_kernel(const void* logits, int dtype, int64_t T, int64_t E, int64_t k,
                            int64_t* expert, float* gate, float* zterm, uint8_t* bad,
                            int64_t* status) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  float mx = -INFINITY;
  bool finite = true;
  for (int64_t e = 0; e < E; ++e) {
    const float v = load(logits, dtype, t * E + e);
    finite &= isfinite(v);
    mx = fmaxf(mx, v);
  }
  double sum = 0.0;
  for (int64_t e = 0; e < E; ++e) sum += exp(static_cast<double>(load(logits, dtype, t * E + e) - mx));
  const double lse = mx + log(sum);
  zterm[t] = finite ? static_cast<float>(lse * lse) : 0.0f;
  bad[t] = finite ? 0 : 1;
  if (!finite) atomicAdd(reinterpret_cast<unsigned long long*>(status), 1ULL);
  float picked = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float best_v = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= expert[t * k + i] == e;
      const float v = load(logits, dtype, t * E + e);
      if (!taken && (best < 0 || v > best_v)) {
        best = e;
        best_v = v;
      }
    }
    const float p = finite ? static_cast<float>(exp(static_cast<double>(best_v - mx)) / sum) : 0.0f;
    expert[t * k + j] = best;
    gate[t * k + j] = p;
    picked += p;
  }
  if (k > 1 && picked > 0.0f)
    for (int64_t j = 0; j < k; ++j) gate[t * k + j] /= picked;
}

// Order of the n = T * k assignments: by_rank (q = j * T + t) or by slot (s = t * k + j).
__device__ inline int64_t slot_at(int64_t q, int64_t T, int64_t k, bool by_rank) {
  return by_rank ? (q % T) * k + q / T : q;
}

// Whether an assignment takes part: pass 1 (by rank) skips non-finite tokens, pass 2 (by
// slot) takes only kept assignments.
__device__ inline bool takes_part(int64_t s, int64_t k, const uint8_t* bad, const uint8_t* dropped,
                                  bool by_rank) {
  return by_rank ? bad[s / k] == 0 : dropped[s] == 0;
}

__global__ void hist_kernel(const int64_t* expert, const uint8_t* bad, const uint8_t* dropped,
                            int64_t T, int64_t k, int64_t E, bool by_rank, int64_t* hist) {
  extern __shared__ int counts[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t n = T * k, lo = blockIdx.x * static_cast<int64_t>(kChunk);
  for (int64_t q = lo + threadIdx.x; q < n && q < lo + kChunk; q += blockDim.x) {
    const int64_t s = slot_at(q, T, k, by_rank);
    if (takes_part(s, k, bad, dropped, by_rank)) atomicAdd(&counts[expert[s]], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[blockIdx.x * E + e] = counts[e];
}

// One block, one thread per expert: exclusive scan over chunks. Pass 1 then derives the
// kept counts, offsets, padded offsets and sizes; pass 2 starts each expert at its offset.
__global__ void scan_kernel(const int64_t* hist, int64_t chunks, int64_t E, int64_t capacity,
                            int64_t block, bool by_rank, int64_t* base, int64_t* total,
                            int64_t* counts, int64_t* offsets, int64_t* pad_offsets, int64_t* sizes) {
  const int64_t e = threadIdx.x;
  if (e < E) {
    int64_t run = by_rank ? 0 : offsets[e];
    for (int64_t c = 0; c < chunks; ++c) {
      base[c * E + e] = run;
      run += hist[c * E + e];
    }
    if (by_rank) {
      total[e] = run;
      counts[e] = run < capacity ? run : capacity;
    }
  }
  __syncthreads();
  if (by_rank && threadIdx.x == 0) {
    offsets[0] = pad_offsets[0] = 0;
    for (int64_t i = 0; i < E; ++i) {
      offsets[i + 1] = offsets[i] + counts[i];
      pad_offsets[i + 1] = pad_offsets[i] + (counts[i] + block - 1) / block * block;
    }
    sizes[0] = offsets[E];
    sizes[1] = pad_offsets[E];
    sizes[2] = pad_offsets[E] / block;
  }
}

// One thread per chunk ranks its assignments in order; per-expert counters live in shared
// memory (E ints per thread of the block).
__global__ void rank_kernel(const int64_t* expert, const uint8_t* bad, int64_t T, int64_t k,
                            int64_t E, int64_t capacity, bool by_rank, const int64_t* base,
                            uint8_t* dropped, int64_t* perm, int64_t* inverse, int64_t chunks) {
  extern __shared__ int seen[];
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= chunks) return;
  int* mine = seen + threadIdx.x * E;
  for (int64_t e = 0; e < E; ++e) mine[e] = 0;
  const int64_t n = T * k;
  for (int64_t q = c * kChunk; q < n && q < (c + 1) * kChunk; ++q) {
    const int64_t s = slot_at(q, T, k, by_rank);
    if (by_rank) {
      if (bad[s / k]) {
        dropped[s] = 1;
        continue;
      }
      const int64_t e = expert[s];
      dropped[s] = base[c * E + e] + mine[e]++ < capacity ? 0 : 1;
    } else {
      if (dropped[s]) {
        inverse[s] = -1;
        continue;
      }
      const int64_t e = expert[s];
      const int64_t pos = base[c * E + e] + mine[e]++;
      perm[pos] = s;
      inverse[s] = pos;
    }
  }
}

__global__ void padded_kernel(const int64_t* expert, const int64_t* inverse, const int64_t* offsets,
                              const int64_t* pad_offsets, int64_t n, int64_t* padded) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= n || inverse[s] < 0) return;
  const int64_t e = expert[s];
  padded[pad_offsets[e] + inverse[s] - offsets[e]] = s;
}

__global__ void blocks_kernel(const int64_t* pad_offsets, int64_t E, int64_t block,
                              int64_t max_blocks, int64_t* block_expert) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= max_blocks) return;
  const int64_t row = b * block;
  if (row >= pad_offsets[E]) {
    block_expert[b] = -1;
    return;
  }
  int64_t lo = 0, hi = E;  // largest e with pad_offsets[e] <= row
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (pad_offsets[mid] <= row) lo = mid; else hi = mid;
  }
  block_expert[b] = lo;
}

// Launches every step on `stream`; the arrays are checked by the caller (route_cuda).
int launch(int dtype, int64_t T, int64_t E, int64_t k, int64_t capacity, int64_t block,
           int64_t max_blocks, cudaStream_t stream, const void* logits, int64_t* ex, float* gate,
           float* zterm, uint8_t* bd, uint8_t* dr, int64_t* hs, int64_t* bs, int64_t* total,
           int64_t* counts, int64_t* of, int64_t* po, int64_t* pm, int64_t* iv, int64_t* padded,
           int64_t* block_expert, int64_t* sizes, int64_t* status) {
  const int64_t n = T * k, chunks = (n + kChunk - 1) / kChunk;
  const int64_t max_padded = max_blocks * block;  // the caller sizes padded and block_expert
  const int64_t cap = capacity < 0 ? n : capacity;
  cudaMemsetAsync(status, 0, sizeof(int64_t), stream);
  cudaMemsetAsync(pm, 0xFF, n * sizeof(int64_t), stream);  // -1 past n_kept
  cudaMemsetAsync(padded, 0xFF, max_padded * sizeof(int64_t), stream);
  if (T > 0) {
    topk_kernel<<<(T + 255) / 256, 256, 0, stream>>>(logits, dtype, T, E, k, ex, gate, zterm, bd,
                                                     status);
  }
  const int rank_threads = E <= 64 ? 64 : (E <= 256 ? 16 : 4);  // keep E ints per thread in 48 KB
  for (int pass = 0; pass < 2; ++pass) {
    const bool by_rank = pass == 0;
    if (chunks > 0) {
      hist_kernel<<<chunks, 256, E * sizeof(int), stream>>>(ex, bd, dr, T, k, E, by_rank, hs);
    }
    scan_kernel<<<1, 1024, 0, stream>>>(hs, chunks, E, cap, block, by_rank, bs, total, counts, of,
                                        po, sizes);
    if (chunks > 0) {
      rank_kernel<<<(chunks + rank_threads - 1) / rank_threads, rank_threads,
                    rank_threads * E * sizeof(int), stream>>>(ex, bd, T, k, E, cap, by_rank, bs, dr,
                                                              pm, iv, chunks);
    }
  }
  if (n > 0) {
    padded_kernel<<<(n + 255) / 256, 256, 0, stream>>>(ex, iv, of, po, n, padded);
  }
  blocks_kernel<<<(max_blocks + 255) / 256, 256, 0, stream>>>(po, E, block, max_blocks,
                                                            block_expert);
  return static_cast<int>(cudaGetLastError());
}

// ---- Argument checks: a bad call is a TypeError or ValueError, never a launch. ----

// An element type: the __cuda_array_interface__ typestrs accepted for it (space-separated).
struct Kind {
  const char* name;
  const char* typestrs;
  int64_t itemsize;
};
constexpr Kind kFloat32{"float32", "<f4", 4};
constexpr Kind kFloat16{"float16", "<f2", 2};
constexpr Kind kBf16Bits{"16-bit integer (bfloat16 bits)", "<i2 <u2", 2};
constexpr Kind kInt64{"int64", "<i8", 8};
constexpr Kind kUint8{"uint8", "|u1 <u1", 1};

// One argument's device memory, as its __cuda_array_interface__ describes it.
struct DeviceArray {
  std::string name;
  char* ptr;
  int64_t bytes;
};

template <typename V>
V field(const py::dict& cai, const char* key, const std::string& name) {
  if (!cai.contains(key)) bad_type(name + ".__cuda_array_interface__ has no '" + key + "'");
  try {
    return cai[key].cast<V>();
  } catch (const py::cast_error&) {
    bad_type(name + ".__cuda_array_interface__['" + key + "'] has the wrong type");
  }
}

DeviceArray device_array(const py::object& obj, const char* name_c, const Kind& kind, int64_t need,
                         bool output) {
  const std::string name = name_c;
  if (!py::hasattr(obj, "__cuda_array_interface__"))
    bad_type(name + " must be a CUDA array (a CUDA tensor: __cuda_array_interface__), got " +
             Py_TYPE(obj.ptr())->tp_name);
  const py::object cai_obj = obj.attr("__cuda_array_interface__");
  if (!py::isinstance<py::dict>(cai_obj)) bad_type(name + ".__cuda_array_interface__ must be a dict");
  const auto cai = cai_obj.cast<py::dict>();
  const auto typestr = field<std::string>(cai, "typestr", name);
  const std::string accepted = std::string(" ") + kind.typestrs + " ";
  if (typestr.empty() || accepted.find(" " + typestr + " ") == std::string::npos)
    bad_type(name + " must hold " + kind.name + " items (typestr " + kind.typestrs + "), got '" +
             typestr + "'");
  const auto shape = field<std::vector<int64_t>>(cai, "shape", name);
  int64_t items = 1;
  for (const int64_t d : shape) {
    if (d < 0) bad_value(name + " has a negative dimension");
    items = mul(items, d);
  }
  // torch omits strides (None) for C-contiguous tensors; check any that are given.
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = field<std::vector<int64_t>>(cai, "strides", name);
    if (strides.size() != shape.size()) bad_value(name + " has strides of the wrong length");
    int64_t expect = kind.itemsize;
    for (size_t i = shape.size(); items > 0 && i-- > 0;) {
      if (shape[i] != 1 && strides[i] != expect) bad_value(name + " must be C-contiguous");
      expect = mul(expect, shape[i]);
    }
  }
  if (cai.contains("mask") && !cai["mask"].is_none()) bad_value(name + " must not be masked");
  const auto data = field<std::pair<uintptr_t, bool>>(cai, "data", name);
  if (output && data.second) bad_value(name + " is read-only, but the router writes it");
  if (items < need)
    bad_value(name + " holds " + std::to_string(items) + " items, needs at least " +
              std::to_string(need) + " for these T, E, k, block");
  if (data.first % kind.itemsize != 0) bad_value(name + " is not aligned to its item size");
  return {name, reinterpret_cast<char*>(data.first), mul(items, kind.itemsize)};
}

// Overlapping outputs would let one kernel corrupt another's indices.
void check_disjoint(std::initializer_list<const DeviceArray*> all) {
  for (auto a = all.begin(); a != all.end(); ++a)
    for (auto b = a + 1; b != all.end(); ++b)
      if ((*a)->bytes > 0 && (*b)->bytes > 0 && (*a)->ptr < (*b)->ptr + (*b)->bytes &&
          (*b)->ptr < (*a)->ptr + (*a)->bytes)
        bad_value((*a)->name + " and " + (*b)->name + " overlap in memory");
}

// The first and last byte of every array must be device memory on the current device (the
// kernels run there). A host query: no synchronisation. Errors are cleared so that the
// launches' cudaGetLastError reports only their own.
void check_on_device(std::initializer_list<const DeviceArray*> all) {
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(kWho + "no usable CUDA device (" + cudaGetErrorString(err) + ")");
  }
  for (const DeviceArray* a : all) {
    if (a->bytes == 0) continue;  // empty: torch reports a null pointer, nothing is accessed
    for (const char* p : {a->ptr, a->ptr + a->bytes - 1}) {
      cudaPointerAttributes attr{};
      err = cudaPointerGetAttributes(&attr, p);
      if (err != cudaSuccess) cudaGetLastError();
      if (err != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged))
        bad_value(a->name + " is not CUDA device memory (all of it)");
      if (attr.device != device)
        bad_value(a->name + " is on device " + std::to_string(attr.device) +
                  ", not the current device " + std::to_string(device));
    }
  }
}

// Arrays: any object with __cuda_array_interface__ (CUDA tensors), C-contiguous, sizes as in
// router.py's _route_cuda (hist, base: ceil(T k / 256) * E; max_blocks >= ceil(T k / block)
// + E). The stream stays an integer: no API checks a stream handle without dereferencing it,
// and torch's current stream is the only one passed. Returns 0 or the CUDA error code of the
// launches; a bad argument raises TypeError or ValueError before anything is launched.
int route_cuda(int dtype, int64_t T, int64_t E, int64_t k, int64_t capacity, int64_t block,
               int64_t max_blocks, uintptr_t stream, const py::object& logits,
               const py::object& expert, const py::object& gate, const py::object& zterm,
               const py::object& bad, const py::object& dropped, const py::object& hist,
               const py::object& base, const py::object& total, const py::object& counts,
               const py::object& offsets, const py::object& pad_offsets, const py::object& perm,
               const py::object& inverse, const py::object& padded, const py::object& block_expert,
               const py::object& sizes, const py::object& status) {
  if (dtype < 0 || dtype > 2)
    bad_value("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  if (T < 0) bad_value("T must be >= 0, got " + std::to_string(T));
  if (E < 1 || E > 1024) bad_value("E must be in [1, 1024], got " + std::to_string(E));
  if (k < 1 || k > E)
    bad_value("k must be in [1, E=" + std::to_string(E) + "], got " + std::to_string(k));
  if (block < 1) bad_value("block must be >= 1, got " + std::to_string(block));
  const int64_t n = mul(T, k);
  const int64_t chunks = n / kChunk + (n % kChunk != 0);
  const int64_t min_blocks = add(n / block + (n % block != 0), E);
  if (max_blocks < min_blocks)
    bad_value("max_blocks must be >= ceil(T*k/block) + E = " + std::to_string(min_blocks) +
              ", got " + std::to_string(max_blocks));
  const int64_t E1 = E + 1, hist_items = mul(chunks, E);
  const Kind& logits_kind = dtype == 0 ? kFloat32 : (dtype == 1 ? kFloat16 : kBf16Bits);
  const DeviceArray a[] = {
      device_array(logits, "logits", logits_kind, mul(T, E), false),
      device_array(expert, "expert", kInt64, n, true),
      device_array(gate, "gate", kFloat32, n, true),
      device_array(zterm, "zterm", kFloat32, T, true),
      device_array(bad, "bad", kUint8, T, true),
      device_array(dropped, "dropped", kUint8, n, true),
      device_array(hist, "hist", kInt64, hist_items, true),
      device_array(base, "base", kInt64, hist_items, true),
      device_array(total, "total", kInt64, E, true),
      device_array(counts, "counts", kInt64, E, true),
      device_array(offsets, "offsets", kInt64, E1, true),
      device_array(pad_offsets, "pad_offsets", kInt64, E1, true),
      device_array(perm, "perm", kInt64, n, true),
      device_array(inverse, "inverse", kInt64, n, true),
      device_array(padded, "padded", kInt64, mul(max_blocks, block), true),
      device_array(block_expert, "block_expert", kInt64, max_blocks, true),
      device_array(sizes, "sizes", kInt64, 3, true),
      device_array(status, "status", kInt64, 1, true)};
  const auto all = {&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8],
                    &a[9], &a[10], &a[11], &a[12], &a[13], &a[14], &a[15], &a[16], &a[17]};
  check_disjoint(all);
  check_on_device(all);
  auto i64 = [&](int i) { return reinterpret_cast<int64_t*>(a[i].ptr); };
  auto u8 = [&](int i) { return reinterpret_cast<uint8_t*>(a[i].ptr); };
  auto f32 = [&](int i) { return reinterpret_cast<float*>(a[i].ptr); };
  return launch(dtype, T, E, k, capacity, block, max_blocks, reinterpret_cast<cudaStream_t>(stream),
                a[0].ptr, i64(1), f32(2), f32(3), u8(4), u8(5), i64(6), i64(7), i64(8), i64(9),
                i64(10), i64(11), i64(12), i64(13), i64(14), i64(15), i64(16), i64(17));
}

}  // namespace

PYBIND11_MODULE(_router_cuda, m) {
  m.doc() = "kcap MoE router (CUDA). Use kcap.models.router.route, which validates inputs.";
  m.def("route_cuda", &route_cuda, "Route tokens on the GPU into caller-allocated CUDA arrays "
        "(checked here) on the given stream (an integer handle). Returns 0 or a CUDA error code.",
        py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("capacity"),
        py::arg("block"), py::arg("max_blocks"), py::arg("stream"), py::arg("logits"),
        py::arg("expert"), py::arg("gate"), py::arg("zterm"), py::arg("bad"), py::arg("dropped"),
        py::arg("hist"), py::arg("base"), py::arg("total"), py::arg("counts"), py::arg("offsets"),
        py::arg("pad_offsets"), py::arg("perm"), py::arg("inverse"), py::arg("padded"),
        py::arg("block_expert"), py::arg("sizes"), py::arg("status"));
}
