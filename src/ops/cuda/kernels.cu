// pipe's CUDA kernels: the GPU side of the training-path ops in src/ops (the CPU side of each op
// sits in the same Rust file as its CUDA launch). Compiled to PTX by build.rs with nvcc when the
// `cuda` feature is on; matrix products go to cuBLAS, everything else is here.
//
// Determinism: no atomics anywhere. Every reduction has a fixed shape: a warp's butterfly
// (__shfl_xor_sync over 32 lanes) or a sequential loop in a fixed order, and column reductions
// over rows go through fixed blocks of ROW_BLOCK rows, then the blocks in order. So a kernel's
// result depends on its inputs alone, never on scheduling, and two runs give the same bits.
//
// Precision: every kernel is written once as a template over the stored type T (float or bf16)
// and computes in float; bf16 is only how tensors are stored (rounded to nearest even on store).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Must match ops::ROW_BLOCK on the Rust side.
#define ROW_BLOCK 32

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 st<bf16>(float x) { return __float2bfloat16_rn(x); }

#define FOR_EACH(i, n)                                                                             \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n);                 \
       i += (size_t)blockDim.x * gridDim.x)

// The same value in every lane; the butterfly's order is fixed.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per row: the row index of this warp, lane in `lane`.
#define WARP_ROW(row, lane)                                                                        \
  const size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;                   \
  const int lane = threadIdx.x % 32;

// ---- dropout: the CPU's counter-based mask (ops/dropout.rs), bit for bit -----------------------

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// 0 or `scale` for element `index` of the counter space of mask `key`.
__device__ __forceinline__ float drop_factor(uint64_t key, uint32_t threshold, float scale,
                                             uint64_t index) {
  const uint64_t bits = splitmix64(key ^ ((index >> 2) * 0x9e3779b97f4a7c15ULL));
  const uint32_t draw = (uint32_t)((bits >> ((index & 3) * 16)) & 0xffff);
  return draw < threshold ? 0.0f : scale;
}

template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t key, uint32_t threshold, float scale) {
  FOR_EACH(i, n) y[i] = st<T>(ld(x[i]) * drop_factor(key, threshold, scale, i));
}

// ---- activations (ops/gelu.rs): kind 0 gelu (erf), 1 gelu (tanh), 2 relu, 3 tanh, 4 silu -------

__device__ __forceinline__ void act_value_slope(int kind, float x, float* value, float* slope) {
  switch (kind) {
    case 0: {
      const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
      const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
      *value = x * cdf;
      *slope = cdf + x * pdf;
      break;
    }
    case 1: {
      const float c = 0.7978845608028654f, a = 0.044715f;
      const float t = tanhf(c * (x + a * x * x * x));
      *value = 0.5f * x * (1.0f + t);
      *slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * a * x * x);
      break;
    }
    case 2:
      *value = x > 0.0f ? x : 0.0f;
      *slope = x > 0.0f ? 1.0f : 0.0f;
      break;
    case 4: {
      const float s = 1.0f / (1.0f + expf(-x));
      *value = x * s;
      *slope = s * (1.0f + x * (1.0f - s));
      break;
    }
    default: {
      const float t = tanhf(x);
      *value = t;
      *slope = 1.0f - t * t;
    }
  }
}

template <typename T>
__device__ void activation_fwd(int kind, const T* x, T* y, size_t n) {
  FOR_EACH(i, n) {
    float v, s;
    act_value_slope(kind, ld(x[i]), &v, &s);
    y[i] = st<T>(v);
  }
}

template <typename T>
__device__ void activation_bwd(int kind, const T* x, const T* g, T* dx, size_t n) {
  FOR_EACH(i, n) {
    float v, s;
    act_value_slope(kind, ld(x[i]), &v, &s);
    dx[i] = st<T>(ld(g[i]) * s);
  }
}

// ---- column sums over rows, in fixed blocks (bias gradients, LayerNorm's weight gradients) -----

// partials[block][c] = sum of rows [block*ROW_BLOCK, ...) of column c. Grid: (blocks, col tiles).
template <typename T>
__device__ void col_sum_partials(const T* g, float* partials, int rows, int cols) {
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int r0 = blockIdx.x * ROW_BLOCK;
  const int r1 = min(rows, r0 + ROW_BLOCK);
  float acc = 0.0f;
  for (int r = r0; r < r1; ++r) acc += ld(g[(size_t)r * cols + c]);
  partials[(size_t)blockIdx.x * cols + c] = acc;
}

// out[c] = sum over blocks, in order, of partials[block][c].
template <typename T>
__device__ void col_sum_finish(const float* partials, T* out, int blocks, int cols) {
  FOR_EACH(c, cols) {
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) acc += partials[(size_t)b * cols + c];
    out[c] = st<T>(acc);
  }
}

// y[r][c] = b[c]: the seed of a linear layer's output, which the GEMM then accumulates into.
template <typename T>
__device__ void broadcast_rows(const T* b, T* y, size_t rows, size_t cols) {
  FOR_EACH(i, rows * cols) y[i] = b[i % cols];
}

// ---- LayerNorm (ops/layer_norm.rs) --------------------------------------------------------------

// Mean (0 without centring: RMSNorm) and 1/std about it of one row, every lane of the warp getting
// both.
template <typename T>
__device__ __forceinline__ void row_moments(const T* x, int d, float eps, int center, int lane,
                                            float* mean, float* rstd) {
  float s = 0.0f;
  if (center)
    for (int i = lane; i < d; i += 32) s += ld(x[i]);
  const float m = center ? warp_sum(s) / d : 0.0f;
  float v = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float c = ld(x[i]) - m;
    v += c * c;
  }
  *mean = m;
  *rstd = 1.0f / sqrtf(warp_sum(v) / d + eps);
}

template <typename T>
__device__ void layer_norm_fwd(const T* x, const T* w, const T* b, T* y, int rows, int d, float eps,
                               int center) {
  WARP_ROW(row, lane);
  if (row >= (size_t)rows) return;
  const T* xr = x + row * d;
  float mean, rstd;
  row_moments(xr, d, eps, center, lane, &mean, &rstd);
  for (int i = lane; i < d; i += 32)
    y[row * d + i] = st<T>((ld(xr[i]) - mean) * rstd * ld(w[i]) + ld(b[i]));
}

// dx for each row, and each row's (mean, rstd) into `stats` for the weight gradients.
template <typename T>
__device__ void layer_norm_bwd_dx(const T* x, const T* w, const T* g, T* dx, float* stats, int rows,
                                  int d, float eps, int center) {
  WARP_ROW(row, lane);
  if (row >= (size_t)rows) return;
  const T* xr = x + row * d;
  const T* gr = g + row * d;
  float mean, rstd;
  row_moments(xr, d, eps, center, lane, &mean, &rstd);
  float sum_gw = 0.0f, sum_gw_xhat = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float gw = ld(gr[i]) * ld(w[i]);
    sum_gw += gw;
    sum_gw_xhat += gw * (ld(xr[i]) - mean) * rstd;
  }
  // Without centring, the mean's gradient term is absent.
  const float mean_gw = center ? warp_sum(sum_gw) / d : 0.0f, mean_gw_xhat = warp_sum(sum_gw_xhat) / d;
  for (int i = lane; i < d; i += 32) {
    const float xhat = (ld(xr[i]) - mean) * rstd;
    dx[row * d + i] = st<T>(rstd * (ld(gr[i]) * ld(w[i]) - mean_gw - xhat * mean_gw_xhat));
  }
  if (lane == 0) {
    stats[2 * row] = mean;
    stats[2 * row + 1] = rstd;
  }
}

// partials[block][c] = sum g*xhat, partials[block][d + c] = sum g, over the block's rows.
template <typename T>
__device__ void layer_norm_bwd_partials(const T* x, const T* g, const float* stats, float* partials,
                                        int rows, int d) {
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int r0 = blockIdx.x * ROW_BLOCK;
  const int r1 = min(rows, r0 + ROW_BLOCK);
  float acc_w = 0.0f, acc_b = 0.0f;
  for (int r = r0; r < r1; ++r) {
    const float gv = ld(g[(size_t)r * d + c]);
    acc_w += gv * (ld(x[(size_t)r * d + c]) - stats[2 * r]) * stats[2 * r + 1];
    acc_b += gv;
  }
  partials[(size_t)blockIdx.x * 2 * d + c] = acc_w;
  partials[(size_t)blockIdx.x * 2 * d + d + c] = acc_b;
}

// ---- attention over packed segments (ops/attention.rs) ------------------------------------------
// The packed (tokens, heads*dim) projections are laid out as (segments, heads, L, dim), zero
// beyond each segment's length, so that cuBLAS's strided batched GEMMs can run every
// (segment, head) pair at once; L is the longest segment of the batch rounded up to a multiple of 8
// (aligned leading dimensions for the tensor cores). A token's row of one projection is `stride`
// elements after the previous one (q, k and v side by side in one (tokens, 3 heads*dim) buffer).

template <typename T>
__device__ void attn_pad(const T* src, T* dst, const int* starts, const int* lens, int heads, int L,
                         int dim, size_t stride, size_t total) {
  FOR_EACH(i, total) {
    const int e = i % dim;
    const int t = (i / dim) % L;
    const int h = (i / ((size_t)dim * L)) % heads;
    const int s = i / ((size_t)dim * L * heads);
    dst[i] = t < lens[s] ? src[((size_t)starts[s] + t) * stride + (size_t)h * dim + e] : st<T>(0.0f);
  }
}

template <typename T>
__device__ void attn_unpad(const T* src, T* dst, const int* starts, const int* lens, int heads,
                           int L, int dim, size_t stride, size_t total) {
  FOR_EACH(i, total) {
    const int e = i % dim;
    const int t = (i / dim) % L;
    const int h = (i / ((size_t)dim * L)) % heads;
    const int s = i / ((size_t)dim * L * heads);
    if (t < lens[s]) dst[((size_t)starts[s] + t) * stride + (size_t)h * dim + e] = src[i];
  }
}

// One warp per score row (segment, head, query t): p = softmax(scale * s) over the segment's keys
// within `window` positions of t (all of them when window < 0) and, when `causal`, at or before t,
// written over s; pd = p through the
// dropout mask (the CPU's counter: offsets[segment] + head*len*len + t*len + key). Keys outside the
// window, and rows and columns beyond the segment, become 0 in both (the backward needs neither:
// its p is 0 there).
template <typename T>
__device__ void attn_softmax(T* s, T* pd, const int* lens, const uint64_t* offsets, int heads,
                             int L, float scale, uint64_t key, uint32_t threshold, float drop_scale,
                             int window, int causal, size_t score_rows) {
  WARP_ROW(row, lane);
  if (row >= score_rows) return;
  const int t = row % L;
  const int h = (row / L) % heads;
  const int seg = row / ((size_t)L * heads);
  const int len = lens[seg];
  T* sr = s + row * L;
  T* pr = pd + row * L;
  if (t >= len) {
    for (int j = lane; j < L; j += 32) sr[j] = pr[j] = st<T>(0.0f);
    return;
  }
  const int lo = window < 0 ? 0 : max(0, t - window);
  const int hi = min(window < 0 ? len : min(len, t + window + 1), causal ? t + 1 : len);
  float m = -INFINITY;
  for (int j = lo + lane; j < hi; j += 32) m = fmaxf(m, ld(sr[j]) * scale);
  m = warp_max(m);
  float sum = 0.0f;
  for (int j = lo + lane; j < hi; j += 32) sum += expf(ld(sr[j]) * scale - m);
  const float inv = 1.0f / warp_sum(sum);
  const uint64_t base = offsets[seg] + ((uint64_t)h * len + t) * len;
  for (int j = lane; j < L; j += 32) {
    const float p = (j >= lo && j < hi) ? expf(ld(sr[j]) * scale - m) * inv : 0.0f;
    const float f = (threshold > 0 && j < len) ? drop_factor(key, threshold, drop_scale, base + j) : 1.0f;
    sr[j] = st<T>(p);
    pr[j] = st<T>(p * f);
  }
}

// In place: d(dropped p) -> d(scores): dp = dpd * mask; ds = scale * p * (dp - sum(dp * p)).
template <typename T>
__device__ void attn_softmax_bwd(const T* p, T* d, const int* lens, const uint64_t* offsets,
                                 int heads, int L, float scale, uint64_t key, uint32_t threshold,
                                 float drop_scale, size_t score_rows) {
  WARP_ROW(row, lane);
  if (row >= score_rows) return;
  const int t = row % L;
  const int h = (row / L) % heads;
  const int seg = row / ((size_t)L * heads);
  const int len = lens[seg];
  const T* prow = p + row * L;
  T* dr = d + row * L;
  if (t >= len) {
    for (int j = lane; j < L; j += 32) dr[j] = st<T>(0.0f);
    return;
  }
  const uint64_t base = offsets[seg] + ((uint64_t)h * len + t) * len;
  float dot = 0.0f;
  for (int j = lane; j < len; j += 32) {
    const float f = threshold > 0 ? drop_factor(key, threshold, drop_scale, base + j) : 1.0f;
    dot += ld(dr[j]) * f * ld(prow[j]);
  }
  dot = warp_sum(dot);
  for (int j = lane; j < L; j += 32) {
    float ds = 0.0f;
    if (j < len) {
      const float f = threshold > 0 ? drop_factor(key, threshold, drop_scale, base + j) : 1.0f;
      ds = scale * ld(prow[j]) * (ld(dr[j]) * f - dot);
    }
    dr[j] = st<T>(ds);
  }
}

// ---- embeddings (ops/embedding.rs) ---------------------------------------------------------------

template <typename T>
__device__ void gather_rows(const T* table, const uint32_t* ids, T* out, size_t n, size_t width) {
  FOR_EACH(i, n) out[i] = table[(size_t)ids[i / width] * width + i % width];
}

// partials[c][j] = sum, in order, of g[order[k]][j] for k in chunk c.
template <typename T>
__device__ void scatter_partials(const T* g, const uint32_t* order, const uint32_t* chunk_starts,
                                 float* partials, size_t n, size_t width) {
  FOR_EACH(i, n) {
    const size_t c = i / width, j = i % width;
    float acc = 0.0f;
    for (uint32_t k = chunk_starts[c]; k < chunk_starts[c + 1]; ++k)
      acc += ld(g[(size_t)order[k] * width + j]);
    partials[i] = acc;
  }
}

// out[row_ids[r]][j] = sum, in order, of row r's chunks' partials.
template <typename T>
__device__ void scatter_finish(const float* partials, const uint32_t* row_chunks,
                               const uint32_t* row_ids, T* out, size_t n, size_t width) {
  FOR_EACH(i, n) {
    const size_t r = i / width, j = i % width;
    float acc = 0.0f;
    for (uint32_t c = row_chunks[r]; c < row_chunks[r + 1]; ++c) acc += partials[(size_t)c * width + j];
    out[(size_t)row_ids[r] * width + j] = st<T>(acc);
  }
}

// ---- instantiations for float and bf16 ----------------------------------------------------------

#define INSTANTIATE(T, S)                                                                          \
  extern "C" __global__ void dropout_##S(const T* x, T* y, size_t n, uint64_t key,                \
                                         uint32_t threshold, float scale) {                        \
    dropout<T>(x, y, n, key, threshold, scale);                                                    \
  }                                                                                                \
  extern "C" __global__ void activation_fwd_##S(int kind, const T* x, T* y, size_t n) {           \
    activation_fwd<T>(kind, x, y, n);                                                              \
  }                                                                                                \
  extern "C" __global__ void activation_bwd_##S(int kind, const T* x, const T* g, T* dx,          \
                                                size_t n) {                                        \
    activation_bwd<T>(kind, x, g, dx, n);                                                          \
  }                                                                                                \
  extern "C" __global__ void col_sum_partials_##S(const T* g, float* partials, int rows,          \
                                                  int cols) {                                      \
    col_sum_partials<T>(g, partials, rows, cols);                                                  \
  }                                                                                                \
  extern "C" __global__ void col_sum_finish_##S(const float* partials, T* out, int blocks,        \
                                                int cols) {                                        \
    col_sum_finish<T>(partials, out, blocks, cols);                                                \
  }                                                                                                \
  extern "C" __global__ void broadcast_rows_##S(const T* b, T* y, size_t rows, size_t cols) {     \
    broadcast_rows<T>(b, y, rows, cols);                                                           \
  }                                                                                                \
  extern "C" __global__ void layer_norm_fwd_##S(const T* x, const T* w, const T* b, T* y,         \
                                                int rows, int d, float eps, int center) {          \
    layer_norm_fwd<T>(x, w, b, y, rows, d, eps, center);                                           \
  }                                                                                                \
  extern "C" __global__ void layer_norm_bwd_dx_##S(const T* x, const T* w, const T* g, T* dx,     \
                                                   float* stats, int rows, int d, float eps,       \
                                                   int center) {                                   \
    layer_norm_bwd_dx<T>(x, w, g, dx, stats, rows, d, eps, center);                                \
  }                                                                                                \
  extern "C" __global__ void layer_norm_bwd_partials_##S(const T* x, const T* g,                  \
                                                         const float* stats, float* partials,      \
                                                         int rows, int d) {                        \
    layer_norm_bwd_partials<T>(x, g, stats, partials, rows, d);                                    \
  }                                                                                                \
  extern "C" __global__ void gather_rows_##S(const T* table, const uint32_t* ids, T* out,        \
                                             size_t n, size_t width) {                            \
    gather_rows<T>(table, ids, out, n, width);                                                     \
  }                                                                                                \
  extern "C" __global__ void scatter_partials_##S(const T* g, const uint32_t* order,              \
                                                  const uint32_t* chunk_starts, float* partials,   \
                                                  size_t n, size_t width) {                        \
    scatter_partials<T>(g, order, chunk_starts, partials, n, width);                               \
  }                                                                                                \
  extern "C" __global__ void scatter_finish_##S(const float* partials, const uint32_t* row_chunks,\
                                                const uint32_t* row_ids, T* out, size_t n,         \
                                                size_t width) {                                    \
    scatter_finish<T>(partials, row_chunks, row_ids, out, n, width);                               \
  }                                                                                                \
  extern "C" __global__ void attn_pad_##S(const T* src, T* dst, const int* starts,                \
                                          const int* lens, int heads, int L, int dim,              \
                                          size_t stride, size_t total) {                           \
    attn_pad<T>(src, dst, starts, lens, heads, L, dim, stride, total);                             \
  }                                                                                                \
  extern "C" __global__ void attn_unpad_##S(const T* src, T* dst, const int* starts,              \
                                            const int* lens, int heads, int L, int dim,            \
                                            size_t stride, size_t total) {                         \
    attn_unpad<T>(src, dst, starts, lens, heads, L, dim, stride, total);                           \
  }                                                                                                \
  extern "C" __global__ void attn_softmax_##S(T* s, T* pd, const int* lens,                       \
                                              const uint64_t* offsets, int heads, int L,           \
                                              float scale, uint64_t key, uint32_t threshold,       \
                                              float drop_scale, int window, int causal,            \
                                              size_t score_rows) {                                 \
    attn_softmax<T>(s, pd, lens, offsets, heads, L, scale, key, threshold, drop_scale, window,     \
                    causal, score_rows);                                                           \
  }                                                                                                \
  extern "C" __global__ void attn_softmax_bwd_##S(const T* p, T* d, const int* lens,              \
                                                  const uint64_t* offsets, int heads, int L,       \
                                                  float scale, uint64_t key, uint32_t threshold,   \
                                                  float drop_scale, size_t score_rows) {           \
    attn_softmax_bwd<T>(p, d, lens, offsets, heads, L, scale, key, threshold, drop_scale,          \
                        score_rows);                                                               \
  }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)

// ---- f32 only: the loss (logits are cast to f32 first) and the optimizer -------------------------

// One block. Each thread takes rows (strided) and writes its rows' weighted losses; thread 0 then
// sums them in row order. out[0] = sum_r w_r * (logsumexp(x_r) - x_r[label_r]) / total_weight.
extern "C" __global__ void cross_entropy_fwd(const float* x, const uint32_t* labels,
                                             const float* weights, float* row_loss, float* out,
                                             int rows, int classes, float total_weight) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const float* xr = x + (size_t)r * classes;
    float m = -INFINITY;
    for (int c = 0; c < classes; ++c) m = fmaxf(m, xr[c]);
    float sum = 0.0f;
    for (int c = 0; c < classes; ++c) sum += expf(xr[c] - m);
    row_loss[r] = weights[r] * (logf(sum) - (xr[labels[r]] - m));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int r = 0; r < rows; ++r) total += row_loss[r];
    out[0] = total / total_weight;
  }
}

// dx_r = g * w_r / total_weight * (softmax(x_r) - onehot(label_r)), one thread per row.
extern "C" __global__ void cross_entropy_bwd(const float* x, const uint32_t* labels,
                                             const float* weights, const float* g, float* dx,
                                             int rows, int classes, float total_weight) {
  FOR_EACH(r, rows) {
    const float* xr = x + r * classes;
    float* dr = dx + r * classes;
    float m = -INFINITY;
    for (int c = 0; c < classes; ++c) m = fmaxf(m, xr[c]);
    float sum = 0.0f;
    for (int c = 0; c < classes; ++c) sum += expf(xr[c] - m);
    const float inv = 1.0f / sum;
    const float scale = g[0] * (weights[r] / total_weight);
    for (int c = 0; c < classes; ++c)
      dr[c] = ((expf(xr[c] - m) * inv) - (c == (int)labels[r] ? 1.0f : 0.0f)) * scale;
  }
}

// torch.optim.AdamW's update of every parameter in one launch (optim/adamw.rs does the same on
// the CPU): blockIdx.y picks the tensor, whose buffers and size come from device arrays of raw
// addresses; each element's arithmetic is the CPU's, operation for operation.
extern "C" __global__ void adamw_multi(const uint64_t* params, const uint64_t* grads,
                                       const uint64_t* ms, const uint64_t* vs,
                                       const uint64_t* sizes, const float* decays, float b1,
                                       float b2, float eps, float step_size, float bc2_sqrt,
                                       float grad_scale) {
  const int t = blockIdx.y;
  float* p = (float*)params[t];
  const float* g = (const float*)grads[t];
  float* m = (float*)ms[t];
  float* v = (float*)vs[t];
  const float decay = decays[t];
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < sizes[t];
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * grad_scale;
    m[i] += (gi - m[i]) * (1.0f - b1);
    v[i] = v[i] * b2 + (1.0f - b2) * gi * gi;
    const float denom = sqrtf(v[i]) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step_size * m[i] / denom;
  }
}

// partials[b] = sum of squares (in double) of chunk b: elements [starts[b], starts[b] + chunk) of
// tensor tensors[b] (clipped to its size), summed by a fixed tree: 256 threads each sum a fixed
// stride, then a fixed pairwise reduction. Every tensor's chunks, in one launch.
extern "C" __global__ void sum_squares_partials(const uint64_t* grads, const uint64_t* sizes,
                                                const uint32_t* tensors, const uint64_t* starts,
                                                size_t chunk, double* partials) {
  __shared__ double acc[256];
  const float* g = (const float*)grads[tensors[blockIdx.x]];
  const size_t begin = starts[blockIdx.x];
  const size_t end = min((size_t)sizes[tensors[blockIdx.x]], begin + chunk);
  double s = 0.0;
  for (size_t i = begin + threadIdx.x; i < end; i += 256) s += (double)g[i] * (double)g[i];
  acc[threadIdx.x] = s;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {
    if (threadIdx.x < o) acc[threadIdx.x] += acc[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}
