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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// Pointers are device addresses of caller-allocated buffers (sizes as in router.py's
// _route_cuda; max_blocks >= ceil(T k / block) + E). Returns 0, -1 for impossible sizes, or
// the CUDA error code of the launches.
int route_cuda(int dtype, int64_t T, int64_t E, int64_t k, int64_t capacity, int64_t block,
               int64_t max_blocks, uintptr_t stream_ptr, uintptr_t logits, uintptr_t expert, uintptr_t gate,
               uintptr_t zterm, uintptr_t bad, uintptr_t dropped, uintptr_t hist, uintptr_t base,
               uintptr_t total, uintptr_t counts, uintptr_t offsets, uintptr_t pad_offsets,
               uintptr_t perm, uintptr_t inverse, uintptr_t padded, uintptr_t block_expert,
               uintptr_t sizes, uintptr_t status) {
  if (T < 0 || E < 1 || E > 1024 || k < 1 || k > E || block < 1) return -1;
  auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  auto* ex = reinterpret_cast<int64_t*>(expert);
  auto* bd = reinterpret_cast<uint8_t*>(bad);
  auto* dr = reinterpret_cast<uint8_t*>(dropped);
  auto* hs = reinterpret_cast<int64_t*>(hist);
  auto* bs = reinterpret_cast<int64_t*>(base);
  auto* of = reinterpret_cast<int64_t*>(offsets);
  auto* po = reinterpret_cast<int64_t*>(pad_offsets);
  auto* pm = reinterpret_cast<int64_t*>(perm);
  auto* iv = reinterpret_cast<int64_t*>(inverse);
  const int64_t n = T * k, chunks = (n + kChunk - 1) / kChunk;
  const int64_t max_padded = max_blocks * block;  // the caller sizes padded and block_expert
  const int64_t cap = capacity < 0 ? n : capacity;
  cudaMemsetAsync(reinterpret_cast<void*>(status), 0, sizeof(int64_t), stream);
  cudaMemsetAsync(pm, 0xFF, n * sizeof(int64_t), stream);  // -1 past n_kept
  cudaMemsetAsync(reinterpret_cast<void*>(padded), 0xFF, max_padded * sizeof(int64_t), stream);
  if (T > 0) {
    topk_kernel<<<(T + 255) / 256, 256, 0, stream>>>(reinterpret_cast<const void*>(logits), dtype, T, E, k,
                                                     ex, reinterpret_cast<float*>(gate),
                                                     reinterpret_cast<float*>(zterm), bd,
                                                     reinterpret_cast<int64_t*>(status));
  }
  const int rank_threads = E <= 64 ? 64 : (E <= 256 ? 16 : 4);  // keep E ints per thread in 48 KB
  for (int pass = 0; pass < 2; ++pass) {
    const bool by_rank = pass == 0;
    if (chunks > 0) {
      hist_kernel<<<chunks, 256, E * sizeof(int), stream>>>(ex, bd, dr, T, k, E, by_rank, hs);
    }
    scan_kernel<<<1, 1024, 0, stream>>>(hs, chunks, E, cap, block, by_rank, bs,
                                        reinterpret_cast<int64_t*>(total),
                                        reinterpret_cast<int64_t*>(counts), of, po,
                                        reinterpret_cast<int64_t*>(sizes));
    if (chunks > 0) {
      rank_kernel<<<(chunks + rank_threads - 1) / rank_threads, rank_threads,
                    rank_threads * E * sizeof(int), stream>>>(ex, bd, T, k, E, cap, by_rank, bs, dr,
                                                              pm, iv, chunks);
    }
  }
  if (n > 0) {
    padded_kernel<<<(n + 255) / 256, 256, 0, stream>>>(ex, iv, of, po, n,
                                                       reinterpret_cast<int64_t*>(padded));
  }
  blocks_kernel<<<(max_blocks + 255) / 256, 256, 0, stream>>>(po, E, block, max_blocks,
                                                            reinterpret_cast<int64_t*>(block_expert));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

PYBIND11_MODULE(_router_cuda, m) {
  m.doc() = "kcap MoE router (CUDA). Use kcap.models.router.route, which validates inputs.";
  m.def("route_cuda", &route_cuda, "Route tokens on the GPU; raw device pointers and a stream.");
}
