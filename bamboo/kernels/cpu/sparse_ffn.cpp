// bamboo::sparse_ffn on the CPU, built just in time by bamboo/kernels/cpu_build.py (the route and why are in
// bamboo/kernels/cpu_sparse_ffn.py). It reads only the selected weight rows, in place: no gathered copy.
//
//   exact:     gate GEMV over every neuron fused with the zero test (skip only where -inf < gate <= 0 in every
//              row), then a gather-GEMV over the up rows of the active neurons, then an axpy over their
//              neuron-major down rows (drelu: only neurons whose product is nonzero in some row).
//   predictor: the caller passes the selected ids (select_neurons picks them from the scores with the reference's
//              rule); gather-GEMV over their gate and up rows, then the axpy.
//
// bf16 or fp32 weights, fp32 accumulation. The rows of a call (1-16) are looped inside, so each weight row is
// read from memory once for all of them. GEMVs are parallel over neuron blocks; the down axpy is parallel over
// output-column slices, so each thread owns its slice of y (no atomics) and streams the active rows' slices.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using bf16 = uint16_t;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) {  // bf16 is the top half of an fp32
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void from_f(float v, float* out) { *out = v; }
inline void from_f(float v, bf16* out) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *out = bf16((u >> 16) | 0x40);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *out = bf16(u >> 16);
}

#ifdef __AVX2__
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
// bf16 -> fp32 by a 16-bit shift: vectorises, unlike c10::BFloat16's scalar conversion.
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline void prefetch(const void* p) {
#ifdef __AVX2__
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#endif
}

// out[r] = <w, x_r> for RB rows of fp32 x (row stride ldx). `next` (or null): the row read after this one, when
// it is not adjacent (a gathered row), fetched alongside this one so its first lines do not stall the next dot.
template <typename T, int RB>
inline void dot_rows(const T* w, const float* x, int64_t ldx, int64_t H, float* out, const T* next) {
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (RB == 1) {  // four chains hide the FMA latency
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 32 <= H; j += 32) {
      if (next) {
        prefetch(next + j);
        if constexpr (sizeof(T) == 4) prefetch(next + j + 16);
      }
      a0 = _mm256_fmadd_ps(load8(w + j), load8(x + j), a0);
      a1 = _mm256_fmadd_ps(load8(w + j + 8), load8(x + j + 8), a1);
      a2 = _mm256_fmadd_ps(load8(w + j + 16), load8(x + j + 16), a2);
      a3 = _mm256_fmadd_ps(load8(w + j + 24), load8(x + j + 24), a3);
    }
    for (; j + 8 <= H; j += 8) a0 = _mm256_fmadd_ps(load8(w + j), load8(x + j), a0);
    out[0] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  } else {
    __m256 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
    for (; j + 8 <= H; j += 8) {
      if (next && j % (64 / sizeof(T)) == 0) prefetch(next + j);
      __m256 wv = load8(w + j);
      for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(wv, load8(x + r * ldx + j), acc[r]);
    }
    for (int r = 0; r < RB; ++r) out[r] = hsum(acc[r]);
  }
#else
  for (int r = 0; r < RB; ++r) out[r] = 0.f;
#endif
  for (; j < H; ++j) {
    float wj = to_f(w[j]);
    for (int r = 0; r < RB; ++r) out[r] += wj * x[r * ldx + j];
  }
}

// out[r] = <w, x_r> for every row: blocks of 4 rows re-read the weight row from L1, not from memory.
template <typename T>
inline void dot_all_rows(const T* w, const float* x, int64_t R, int64_t H, float* out, const T* next = nullptr) {
  int64_t r = 0;  // only the first pass over w fetches `next`: later passes hit the cache
  for (; r + 4 <= R; r += 4) dot_rows<T, 4>(w, x + r * H, H, H, out + r, r == 0 ? next : nullptr);
  if (r + 2 <= R) {
    dot_rows<T, 2>(w, x + r * H, H, H, out + r, r == 0 ? next : nullptr);
    r += 2;
  }
  if (r < R) dot_rows<T, 1>(w, x + r * H, H, H, out + r, r == 0 ? next : nullptr);
}

inline float relu(float v) { return v <= 0.f ? 0.f : v; }  // NaN stays NaN, as torch.relu

// Codes fixed in bamboo/kernels/cpu_sparse_ffn.py (ACT_CODES).
inline float activate(int64_t act, float v) {
  switch (act) {
    case 0: return v;
    case 1: return relu(v);
    case 2: return v / (1.f + std::exp(-v));
    case 3: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case 4: return 0.5f * v * (1.f + std::tanh(0.79788456080286535f * (v + 0.044715f * v * v * v)));
    case 5: return 1.f / (1.f + std::exp(-v));
    case 6: return std::tanh(v);
  }
  return v;
}

// Work below this many weight bytes per thread runs on one thread: waking a second one costs more than it saves
// (microseconds on an idle machine, a scheduler tick on a busy one).
constexpr int64_t kParallelBytes = 256 * 1024;

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

// y[r, :] = sum_k h[k, r] * down[ids[k], :] over column slices owned by one thread each.
template <typename T>
void down_axpy(const T* down, int64_t ldd, const int64_t* ids, const float* h, int64_t K, int64_t R, int64_t O,
               float* y) {
  constexpr int64_t TILE = 64;
  const int64_t tiles = (O + TILE - 1) / TILE;
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, K * TILE * int64_t(sizeof(T))));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t c0 = t0 * TILE, c1 = std::min(t1 * TILE, O);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {  // four neurons per pass: a quarter of the loads and stores of y
      const T* p0 = down + ids[k] * ldd;
      const T* p1 = down + ids[k + 1] * ldd;
      const T* p2 = down + ids[k + 2] * ldd;
      const T* p3 = down + ids[k + 3] * ldd;
      const float* hk = h + k * R;
      const int64_t nk = std::min(k + 4, K - 1);  // the next group's rows, fetched alongside this group's
      const T* q0 = down + ids[nk] * ldd;
      const T* q1 = down + ids[std::min(nk + 1, K - 1)] * ldd;
      const T* q2 = down + ids[std::min(nk + 2, K - 1)] * ldd;
      const T* q3 = down + ids[std::min(nk + 3, K - 1)] * ldd;
      int64_t c = c0;
#ifdef __AVX2__
      for (; c + 8 <= c1; c += 8) {
        if ((c - c0) % (64 / sizeof(T)) == 0) {
          prefetch(q0 + c);
          prefetch(q1 + c);
          prefetch(q2 + c);
          prefetch(q3 + c);
        }
        __m256 w0 = load8(p0 + c), w1 = load8(p1 + c), w2 = load8(p2 + c), w3 = load8(p3 + c);
        for (int64_t r = 0; r < R; ++r) {
          float* yr = y + r * O + c;
          __m256 acc = _mm256_loadu_ps(yr);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(hk[r]), w0, acc);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(hk[R + r]), w1, acc);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(hk[2 * R + r]), w2, acc);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(hk[3 * R + r]), w3, acc);
          _mm256_storeu_ps(yr, acc);
        }
      }
#endif
      for (; c < c1; ++c) {
        float w0 = to_f(p0[c]), w1 = to_f(p1[c]), w2 = to_f(p2[c]), w3 = to_f(p3[c]);
        for (int64_t r = 0; r < R; ++r)
          y[r * O + c] += hk[r] * w0 + hk[R + r] * w1 + hk[2 * R + r] * w2 + hk[3 * R + r] * w3;
      }
    }
    for (; k < K; ++k) {
      const T* p = down + ids[k] * ldd;
      const float* hk = h + k * R;
      int64_t c = c0;
#ifdef __AVX2__
      for (; c + 8 <= c1; c += 8) {
        __m256 w = load8(p + c);
        for (int64_t r = 0; r < R; ++r) {
          float* yr = y + r * O + c;
          _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_set1_ps(hk[r]), w, _mm256_loadu_ps(yr)));
        }
      }
#endif
      for (; c < c1; ++c) {
        float w = to_f(p[c]);
        for (int64_t r = 0; r < R; ++r) y[r * O + c] += hk[r] * w;
      }
    }
  });
}

// (neurons whose gate/up rows were read, neurons whose down rows were read): for weight-traffic accounting
at::Tensor counts(int64_t chosen, int64_t kept) {
  at::Tensor c = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  c.data_ptr<int64_t>()[0] = chosen;
  c.data_ptr<int64_t>()[1] = kept;
  return c;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor& gate_w, const at::Tensor& gate_b,
                                       const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& down_nm,
                                       const at::Tensor& down_b, const at::Tensor& ids_in, int64_t act,
                                       bool drop_zero, double max_share) {
  const int64_t R = x.size(0), H = x.size(1), I = gate_w.size(0), O = down_nm.size(1);
  const int64_t ldg = gate_w.stride(0), ldu = up_w.defined() ? up_w.stride(0) : 0, ldd = down_nm.stride(0);
  const T* xp = ptr<T>(x);
  const T *gw = ptr<T>(gate_w), *gb = ptr<T>(gate_b), *uw = ptr<T>(up_w), *ub = ptr<T>(up_b);
  const T *dn = ptr<T>(down_nm), *db = ptr<T>(down_b);

  std::vector<float> xf(R * H);
  for (int64_t i = 0; i < R * H; ++i) xf[i] = to_f(xp[i]);
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, H * int64_t(sizeof(T))));

  // 1. which neurons: the caller's ids (predictor) or the dense gate with its zero test (exact)
  std::vector<int64_t> ids;
  at::Tensor gate_pre;
  const bool exact = !ids_in.defined();
  if (exact) {
    gate_pre = at::empty({R, I}, x.options().dtype(at::kFloat));
    float* g = gate_pre.data_ptr<float>();
    std::vector<uint8_t> active(I);
    at::parallel_for(0, I, grain, [&](int64_t n0, int64_t n1) {
      float d[16];
      for (int64_t n = n0; n < n1; ++n) {
        uint8_t keep = 0;
        for (int64_t r0 = 0; r0 < R; r0 += 16) {
          const int64_t rb = std::min<int64_t>(16, R - r0);
          dot_all_rows(gw + n * ldg, xf.data() + r0 * H, rb, H, d);
          for (int64_t r = 0; r < rb; ++r) {
            const float v = d[r] + (gb ? to_f(gb[n]) : 0.f);
            g[(r0 + r) * I + n] = v;
            keep |= !(v <= 0.f && v > -std::numeric_limits<float>::infinity());
          }
        }
        active[n] = keep;
      }
    });
    ids.reserve(I);
    for (int64_t n = 0; n < I; ++n)
      if (active[n]) ids.push_back(n);
    if (double(ids.size()) > max_share * double(I))  // dense is faster here: the caller finishes from gate_pre
      return {at::empty({0}, x.options()), gate_pre, counts(int64_t(ids.size()), 0)};
  } else {
    const int64_t* p = ids_in.data_ptr<int64_t>();
    ids.assign(p, p + ids_in.numel());
  }
  const int64_t K = ids.size();

  // 2. h[k, r] = relu(gate) * act(up) for the chosen neurons: gather-GEMV over their rows, in place
  std::vector<float> h(K * R);
  const float* g = exact ? gate_pre.data_ptr<float>() : nullptr;
  std::vector<uint8_t> nonzero(K);
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    float gv[16], uv[16];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = ids[k], next = ids[std::min(k + 1, K - 1)];
      uint8_t any = 0;
      for (int64_t r0 = 0; r0 < R; r0 += 16) {
        const int64_t rb = std::min<int64_t>(16, R - r0);
        if (exact) {
          for (int64_t r = 0; r < rb; ++r) gv[r] = g[(r0 + r) * I + n];
        } else {
          dot_all_rows(gw + n * ldg, xf.data() + r0 * H, rb, H, gv, r0 == 0 ? gw + next * ldg : nullptr);
          if (gb)
            for (int64_t r = 0; r < rb; ++r) gv[r] += to_f(gb[n]);
        }
        if (uw) dot_all_rows(uw + n * ldu, xf.data() + r0 * H, rb, H, uv, r0 == 0 ? uw + next * ldu : nullptr);
        for (int64_t r = 0; r < rb; ++r) {
          float v = relu(gv[r]);
          if (uw) v *= activate(act, uv[r] + (ub ? to_f(ub[n]) : 0.f));
          h[k * R + r0 + r] = v;
          any |= v != 0.f;  // NaN counts as nonzero
        }
      }
      nonzero[k] = any;
    }
  });

  // drelu: relu(up) adds exact zeros of its own; those down rows are skipped too (as in the reference)
  int64_t kept = K;
  if (drop_zero) {
    kept = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (!nonzero[k]) continue;
      ids[kept] = ids[k];
      std::memmove(h.data() + kept * R, h.data() + k * R, R * sizeof(float));
      ++kept;
    }
  }

  // 3. y = h @ down rows, then the bias, in the input dtype
  std::vector<float> yf(R * O, 0.f);
  down_axpy(dn, ldd, ids.data(), h.data(), kept, R, O, yf.data());
  at::Tensor y = at::empty({R, O}, x.options());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < O; ++c) from_f(yf[r * O + c] + (db ? to_f(db[c]) : 0.f), yp + r * O + c);
  return {y, exact ? gate_pre : at::empty({0}, x.options().dtype(at::kFloat)), counts(K, kept)};
}

// Returns (y [R, O], gate_pre [R, I] fp32 in exact mode, counts). An empty y means the active share passed max_share:
// the caller finishes densely from gate_pre (the gate is not computed twice).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_cpu(const at::Tensor& x, const at::Tensor& gate_w,
                                                  const std::optional<at::Tensor>& gate_b,
                                                  const std::optional<at::Tensor>& up_w,
                                                  const std::optional<at::Tensor>& up_b, const at::Tensor& down_nm,
                                                  const std::optional<at::Tensor>& down_b,
                                                  const std::optional<at::Tensor>& ids, int64_t act, bool drop_zero,
                                                  double max_share) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bamboo_cpu.sparse_ffn: x must be a contiguous [rows, hidden]");
  TORCH_CHECK(gate_w.stride(1) == 1 && down_nm.stride(1) == 1, "bamboo_cpu.sparse_ffn: weight rows must be contiguous");
  TORCH_CHECK(!up_w || up_w->stride(1) == 1, "bamboo_cpu.sparse_ffn: up rows must be contiguous");
  auto opt = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };  // biases: contiguous
  at::Tensor idx = ids ? ids->contiguous() : at::Tensor();
  if (idx.defined()) TORCH_CHECK(idx.scalar_type() == at::kLong, "bamboo_cpu.sparse_ffn: ids must be int64");
  if (x.scalar_type() == at::kFloat)
    return run<float>(x, gate_w, opt(gate_b), opt(up_w), opt(up_b), down_nm, opt(down_b), idx, act, drop_zero,
                      max_share);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "bamboo_cpu.sparse_ffn: float32 or bfloat16 only");
  return run<bf16>(x, gate_w, opt(gate_b), opt(up_w), opt(up_b), down_nm, opt(down_b), idx, act, drop_zero,
                   max_share);
}

// Predictor mode's selection (bamboo/ops/sparse_ffn.py predictor_selection) from the fp32 scores [rows, I] torch
// computed: each neuron's best score over the rows (NaN counts as +inf), those strictly above the threshold (the
// threshold rounded to fp32, as torch compares an fp32 tensor with a Python float), and with 0 < top_k < their
// number the top_k best of them, ties by index. Ascending int64 ids. One pass and an nth_element instead of the
// dozen small torch ops (about 0.25 ms per call at 1B shapes).
at::Tensor select_neurons(const at::Tensor& scores, double threshold, int64_t top_k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "bamboo_cpu.select_neurons: scores must be a contiguous float32 [rows, intermediate]");
  const int64_t R = scores.size(0), I = scores.size(1);
  const float* s = scores.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  std::vector<float> best(I);
  std::vector<int64_t> chosen;
  chosen.reserve(I);
  for (int64_t i = 0; i < I; ++i) {
    float b = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t r = 0; r < R; ++r) {
      const float v = s[r * I + i];
      if (std::isnan(v)) nan = true;
      else if (v > b) b = v;
    }
    best[i] = nan ? std::numeric_limits<float>::infinity() : b;
    if (best[i] > t) chosen.push_back(i);
  }
  const int64_t n = static_cast<int64_t>(chosen.size());
  if (top_k > 0 && top_k < n) {
    std::vector<float> values(n);
    for (int64_t j = 0; j < n; ++j) values[j] = best[chosen[j]];
    std::nth_element(values.begin(), values.begin() + (top_k - 1), values.end(), std::greater<float>());
    const float kth = values[top_k - 1];
    int64_t above = 0;
    for (int64_t j = 0; j < n; ++j) above += best[chosen[j]] > kth;
    int64_t ties = top_k - above;  // the first of those equal to the k-th best, by index
    int64_t kept = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float v = best[chosen[j]];
      if (v > kth || (v == kth && ties-- > 0)) chosen[kept++] = chosen[j];
    }
    chosen.resize(kept);
  }
  at::Tensor ids = at::empty({static_cast<int64_t>(chosen.size())}, scores.options().dtype(at::kLong));
  if (!chosen.empty()) std::memcpy(ids.data_ptr<int64_t>(), chosen.data(), chosen.size() * sizeof(int64_t));
  return ids;
}

}  // namespace

TORCH_LIBRARY(bamboo_cpu, m) {
  m.def("sparse_ffn(Tensor x, Tensor gate_w, Tensor? gate_b, Tensor? up_w, Tensor? up_b, Tensor down_nm, "
        "Tensor? down_b, Tensor? ids, int act, bool drop_zero, float max_share) -> (Tensor, Tensor, Tensor)");
  m.impl("sparse_ffn", c10::DispatchKey::CPU, TORCH_FN(sparse_ffn_cpu));
  m.def("select_neurons(Tensor scores, float threshold, int top_k) -> Tensor");
  m.impl("select_neurons", c10::DispatchKey::CPU, TORCH_FN(select_neurons));
}
