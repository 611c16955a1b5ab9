// Training-mode batch norm fused with what follows it in the backbones' blocks: an
// activation, optionally a second batch-normed input added before the activation (the
// ResNet12 shortcut), optionally a 2x2 max pool (stride 2, floor) after it.
//
//   y = maxpool2( act( x1 * a1 + b1  [+ x2 * a2 + b2] ) )     a = w * invstd, b = bias - mean * a
//
// Activations are channels-last (N, C, H, W) tensors, read as (N*H*W, C) row-major
// matrices, float32 or bfloat16 (statistics and arithmetic in float32). One pass reads x
// for the statistics and one writes y, where ATen's batch norm, activation, add and
// pooling each make their own passes over full-size tensors and the autograd graph keeps
// each one's output. The backward recomputes z (and the pooling's argmax) from x.
//
// Sums are taken over fixed chunks of rows in float32 and the chunks added in order in
// float64, so results do not depend on the thread count.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kW = 2 * kV;    // channels per vector step (one bfloat16 vector)
constexpr int64_t kChunk = 64;   // rows (or pooling windows) per unit of work in the sums

enum Act : int64_t { kIdentity = 0, kRelu = 1, kLeaky = 2 };

// kW channels as two float vectors.
struct Pair {
  Vec lo, hi;
};
inline Pair load(const float* p) { return {Vec::loadu(p), Vec::loadu(p + kV)}; }
inline Pair load(const c10::BFloat16* p) {
  auto [lo, hi] = at::vec::convert_bfloat16_float(Vectorized<c10::BFloat16>::loadu(p));
  return {lo, hi};
}
inline void store(float* p, const Pair& v) {
  v.lo.store(p);
  v.hi.store(p + kV);
}
inline void store(c10::BFloat16* p, const Pair& v) { at::vec::convert_float_bfloat16(v.lo, v.hi).store(p); }
inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }
// The pooling's argmax (window position 0..3) per channel, kept as one byte each.
inline Pair load_which(const uint8_t* p) {
  float tmp[kW];
  for (int64_t i = 0; i < kW; ++i) tmp[i] = p[i];
  return {Vec::loadu(tmp), Vec::loadu(tmp + kV)};
}
inline void store_which(uint8_t* p, const Pair& which) {
  float tmp[kW];
  which.lo.store(tmp);
  which.hi.store(tmp + kV);
  for (int64_t i = 0; i < kW; ++i) p[i] = static_cast<uint8_t>(tmp[i]);
}
// The value the tensor will hold: pooling compares stored values, as ATen's does.
inline Pair rounded(const Pair& v, const float*) { return v; }
inline Pair rounded(const Pair& v, const c10::BFloat16*) {
  auto [lo, hi] = at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v.lo, v.hi));
  return {lo, hi};
}
inline float rounded1(float v, const float*) { return v; }
inline float rounded1(float v, const c10::BFloat16*) { return static_cast<float>(c10::BFloat16(v)); }

template <int A>
inline Vec act(const Vec& z, const Vec& slope) {
  if constexpr (A == kIdentity) return z;
  else if constexpr (A == kRelu) return Vec::blendv(Vec(0.f), z, z > Vec(0.f));
  else return Vec::blendv(z * slope, z, z > Vec(0.f));
}
template <int A>
inline Vec act_grad(const Vec& z, const Vec& g, const Vec& slope) {
  if constexpr (A == kIdentity) return g;
  else if constexpr (A == kRelu) return Vec::blendv(Vec(0.f), g, z > Vec(0.f));
  else return Vec::blendv(g * slope, g, z > Vec(0.f));
}
template <int A>
inline float act1(float z, float slope) {
  if constexpr (A == kIdentity) return z;
  else if constexpr (A == kRelu) return z > 0.f ? z : 0.f;
  else return z > 0.f ? z : z * slope;
}
template <int A>
inline float act_grad1(float z, float g, float slope) {
  if constexpr (A == kIdentity) return g;
  else if constexpr (A == kRelu) return z > 0.f ? g : 0.f;
  else return z > 0.f ? g : g * slope;
}

std::vector<float> as_floats(const at::Tensor& t) {
  auto c = t.detach().to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

// Shape of one call: M = N*H*W rows of C channels; pooled windows when pooling.
struct Shape {
  int64_t N, C, H, W, M, Ho, Wo;
  Shape(const at::Tensor& x, bool pool)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), M(N * H * W),
        Ho(pool ? H / 2 : H), Wo(pool ? W / 2 : W) {}
  int64_t vec_end() const { return C - C % kW; }
};

// Per-channel mean, biased variance and 1/sqrt(var + eps) of x (M, C), as a (3, C)
// float tensor. One pass: sums of (x - s) and (x - s)^2 with s the first row, which keeps
// the variance from cancelling when |mean| >> std.
template <typename T>
at::Tensor collect(const T* x, const Shape& s, double eps) {
  const int64_t C = s.C, M = s.M, Cv = s.vec_end();
  const int64_t nch = (M + kChunk - 1) / kChunk;
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = load1(x + c);
  std::vector<float> p1(nch * C), p2(nch * C);
  at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float* a1 = p1.data() + k * C;
      float* a2 = p2.data() + k * C;
      std::fill(a1, a1 + C, 0.f);
      std::fill(a2, a2 + C, 0.f);
      for (int64_t r = k * kChunk; r < std::min(M, (k + 1) * kChunk); ++r) {
        const T* row = x + r * C;
        int64_t c = 0;
        for (; c < Cv; c += kW) {
          Pair v = load(row + c);
          Vec dlo = v.lo - Vec::loadu(&shift[c]), dhi = v.hi - Vec::loadu(&shift[c + kV]);
          (Vec::loadu(a1 + c) + dlo).store(a1 + c);
          (Vec::loadu(a1 + c + kV) + dhi).store(a1 + c + kV);
          at::vec::fmadd(dlo, dlo, Vec::loadu(a2 + c)).store(a2 + c);
          at::vec::fmadd(dhi, dhi, Vec::loadu(a2 + c + kV)).store(a2 + c + kV);
        }
        for (; c < C; ++c) {
          const float d = load1(row + c) - shift[c];
          a1[c] += d;
          a2[c] += d * d;
        }
      }
    }
  });
  at::Tensor st = at::empty({3, C}, at::TensorOptions().dtype(at::kFloat));
  float* mean = st.data_ptr<float>();
  float* var = mean + C;
  float* invstd = mean + 2 * C;
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t k = 0; k < nch; ++k) {
      s1 += p1[k * C + c];
      s2 += p2[k * C + c];
    }
    const double md = s1 / M;
    const double v = std::max(s2 / M - md * md, 0.0);
    mean[c] = static_cast<float>(shift[c] + md);
    var[c] = static_cast<float>(v);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(v + eps));
  }
  return st;
}

// What forward and backward share: the inputs and the per-channel affine a, b of each.
template <typename T, int A, bool TWO>
struct Fused {
  const Shape& s;
  const T* X[2];
  std::vector<float> a[2], b[2], mean[2], invstd[2], w[2];
  Vec slope_v;
  float slope;

  Fused(const Shape& shape, const at::Tensor& x1, const at::Tensor* x2, const at::Tensor* wt[2],
        const at::Tensor* bias[2], const at::Tensor* st[2], float sl)
      : s(shape), X{x1.data_ptr<T>(), TWO ? x2->data_ptr<T>() : nullptr}, slope_v(sl), slope(sl) {
    for (int k = 0; k < (TWO ? 2 : 1); ++k) {
      w[k] = as_floats(*wt[k]);
      std::vector<float> bk = as_floats(*bias[k]), stk = as_floats(*st[k]);
      mean[k].assign(stk.begin(), stk.begin() + s.C);
      invstd[k].assign(stk.begin() + 2 * s.C, stk.end());
      a[k].resize(s.C);
      b[k].resize(s.C);
      for (int64_t c = 0; c < s.C; ++c) {
        a[k][c] = w[k][c] * invstd[k][c];
        b[k][c] = bk[c] - mean[k][c] * a[k][c];
      }
    }
  }

  // z = x1 * a1 + b1 [+ x2 * a2 + b2] for channels [c, c + kW) of inputs xs: the one place z
  // is made, so the backward's z is the forward's bit for bit.
  Pair affine(const Pair* xs, int64_t c) const {
    Vec lo = at::vec::fmadd(xs[0].lo, Vec::loadu(&a[0][c]), Vec::loadu(&b[0][c]));
    Vec hi = at::vec::fmadd(xs[0].hi, Vec::loadu(&a[0][c + kV]), Vec::loadu(&b[0][c + kV]));
    if constexpr (TWO) {
      lo = lo + at::vec::fmadd(xs[1].lo, Vec::loadu(&a[1][c]), Vec::loadu(&b[1][c]));
      hi = hi + at::vec::fmadd(xs[1].hi, Vec::loadu(&a[1][c + kV]), Vec::loadu(&b[1][c + kV]));
    }
    return {lo, hi};
  }

  // z at row r, channels [c, c + kW); xs receives the inputs.
  Pair z_at(int64_t r, int64_t c, Pair* xs) const {
    xs[0] = load(X[0] + r * s.C + c);
    if constexpr (TWO) xs[1] = load(X[1] + r * s.C + c);
    return affine(xs, c);
  }
  float z_at1(int64_t r, int64_t c, float* xs) const {
    xs[0] = load1(X[0] + r * s.C + c);
    float z = std::fma(xs[0], a[0][c], b[0][c]);
    if constexpr (TWO) {
      xs[1] = load1(X[1] + r * s.C + c);
      z += std::fma(xs[1], a[1][c], b[1][c]);
    }
    return z;
  }
  Pair act_v(const Pair& z) const { return {act<A>(z.lo, slope_v), act<A>(z.hi, slope_v)}; }
  Pair grad_v(const Pair& z, const Pair& dy) const {
    return {act_grad<A>(z.lo, dy.lo, slope_v), act_grad<A>(z.hi, dy.hi, slope_v)};
  }

  // Rows of pooling window o (the output's row (n, i, j)): top-left, top-right, bottom-left,
  // bottom-right.
  void window_rows(int64_t o, int64_t* r) const {
    const int64_t n = o / (s.Ho * s.Wo), i = (o / s.Wo) % s.Ho, j = o % s.Wo;
    r[0] = (n * s.H + 2 * i) * s.W + 2 * j;
    r[1] = r[0] + 1;
    r[2] = r[0] + s.W;
    r[3] = r[2] + 1;
  }

  // Vector step of one window (the forward): the max of the stored activation and which of
  // the four rows holds it (first one on ties, NaN wins, as ATen's max pooling).
  struct Pick {
    Pair y, which;  // which: the window position 0..3 as float
  };
  Pick pick(const int64_t* r, int64_t c, Pair xs[4][2]) const {
    const T* tag = nullptr;
    Pick p{rounded(act_v(z_at(r[0], c, xs[0])), tag), {Vec(0.f), Vec(0.f)}};
    for (int q = 1; q < 4; ++q) {
      const Pair y = rounded(act_v(z_at(r[q], c, xs[q])), tag);
      Vec mlo = (y.lo > p.y.lo) | (y.lo != y.lo), mhi = (y.hi > p.y.hi) | (y.hi != y.hi);
      p.y = {Vec::blendv(p.y.lo, y.lo, mlo), Vec::blendv(p.y.hi, y.hi, mhi)};
      p.which = {Vec::blendv(p.which.lo, Vec(float(q)), mlo), Vec::blendv(p.which.hi, Vec(float(q)), mhi)};
    }
    return p;
  }
  // The backward's view of a window: the inputs at all four rows (xs), at the argmax the
  // forward kept (xsel), and z there.
  Pair chosen(const int64_t* r, int64_t c, const Pair& which, Pair xs[4][2], Pair* xsel) const {
    for (int q = 0; q < 4; ++q) {
      xs[q][0] = load(X[0] + r[q] * s.C + c);
      if constexpr (TWO) xs[q][1] = load(X[1] + r[q] * s.C + c);
    }
    for (int k = 0; k < (TWO ? 2 : 1); ++k) {
      xsel[k] = xs[0][k];
      for (int q = 1; q < 4; ++q) {
        xsel[k].lo = Vec::blendv(xsel[k].lo, xs[q][k].lo, which.lo == Vec(float(q)));
        xsel[k].hi = Vec::blendv(xsel[k].hi, xs[q][k].hi, which.hi == Vec(float(q)));
      }
    }
    return affine(xsel, c);
  }

  struct Pick1 {
    float y, z;
    int which;
  };
  Pick1 pick1(const int64_t* r, int64_t c, float xs[4][2]) const {
    const T* tag = nullptr;
    Pick1 p{0.f, z_at1(r[0], c, xs[0]), 0};
    p.y = rounded1(act1<A>(p.z, slope), tag);
    for (int q = 1; q < 4; ++q) {
      const float z = z_at1(r[q], c, xs[q]);
      const float y = rounded1(act1<A>(z, slope), tag);
      if (y > p.y || std::isnan(y)) p = Pick1{y, z, q};
    }
    return p;
  }
};

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-d (N, C, H, W) tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              ": expected float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": expected channels-last memory");
}

void check_params(const at::Tensor& w, const at::Tensor& b, int64_t C, const char* name) {
  TORCH_CHECK(w.numel() == C && b.numel() == C, name, ": expected weight and bias of ", C, " elements, got ",
              w.numel(), " and ", b.numel());
}

template <typename T, int A, bool TWO, bool POOL>
std::vector<at::Tensor> forward_impl(const at::Tensor& x1, const at::Tensor* x2, const at::Tensor* w[2],
                                     const at::Tensor* bias[2], double eps, float slope) {
  const Shape s(x1, POOL);
  at::Tensor st[2];
  st[0] = collect(x1.data_ptr<T>(), s, eps);
  if (TWO) st[1] = collect(x2->data_ptr<T>(), s, eps);
  const at::Tensor* stp[2] = {&st[0], TWO ? &st[1] : nullptr};
  const Fused<T, A, TWO> f(s, x1, x2, w, bias, stp, slope);
  const int64_t C = s.C, Cv = s.vec_end();
  at::Tensor y = at::empty({s.N, C, s.Ho, s.Wo}, x1.options(), at::MemoryFormat::ChannelsLast);
  T* Y = y.data_ptr<T>();
  at::Tensor idx;  // pooling: the argmax of each output, (N, Ho, Wo, C) bytes, for the backward
  if constexpr (POOL) {
    idx = at::empty({s.N, s.Ho, s.Wo, C}, x1.options().dtype(at::kByte));
    uint8_t* I = idx.data_ptr<uint8_t>();
    at::parallel_for(0, s.N * s.Ho * s.Wo, 16, [&](int64_t ob, int64_t oe) {
      Pair xs[4][2];
      float xs1[4][2];
      int64_t r[4];
      for (int64_t o = ob; o < oe; ++o) {
        f.window_rows(o, r);
        int64_t c = 0;
        for (; c < Cv; c += kW) {
          const auto p = f.pick(r, c, xs);
          store(Y + o * C + c, p.y);
          store_which(I + o * C + c, p.which);
        }
        for (; c < C; ++c) {
          const auto p = f.pick1(r, c, xs1);
          store1(Y + o * C + c, p.y);
          I[o * C + c] = static_cast<uint8_t>(p.which);
        }
      }
    });
  } else {
    at::parallel_for(0, s.M, 64, [&](int64_t rb, int64_t re) {
      Pair xs[2];
      float xs1[2];
      for (int64_t r = rb; r < re; ++r) {
        int64_t c = 0;
        for (; c < Cv; c += kW) store(Y + r * C + c, f.act_v(f.z_at(r, c, xs)));
        for (; c < C; ++c) store1(Y + r * C + c, act1<A>(f.z_at1(r, c, xs1), slope));
      }
    });
  }
  // (y, stats 1, stats 2, argmax): an empty tensor stands for what the call has none of.
  const at::Tensor none = at::empty({0}, x1.options().dtype(at::kFloat));
  return {y, st[0], TWO ? st[1] : none, POOL ? idx : none};
}

// g = dy * act'(z) where the output came from (at the window's argmax when pooling, 0
// elsewhere); per input k: dbias = sum g, dweight = sum g * xhat and
// dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat)) = ca * g + cb * x + cc.
template <typename T, int A, bool TWO, bool POOL>
std::vector<at::Tensor> backward_impl(const at::Tensor& dy, const at::Tensor& x1, const at::Tensor* x2,
                                      const at::Tensor* w[2], const at::Tensor* bias[2], const at::Tensor* st[2],
                                      const at::Tensor* idx, float slope) {
  constexpr int K = TWO ? 2 : 1;
  // The vector path reads the forward's argmax; the scalar tail recomputes it (pick1).
  const uint8_t* I = POOL ? idx->data_ptr<uint8_t>() : nullptr;
  const Shape s(x1, POOL);
  const Fused<T, A, TWO> f(s, x1, x2, w, bias, st, slope);
  const int64_t C = s.C, Cv = s.vec_end();
  const T* DY = dy.data_ptr<T>();
  // Pass 1: per chunk of rows (windows when pooling), sums of g and g * (x_k - mean_k).
  const int64_t units = POOL ? s.N * s.Ho * s.Wo : s.M;
  const int64_t nch = (units + kChunk - 1) / kChunk;
  std::vector<float> part((1 + K) * nch * C);
  at::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
    Pair xs[4][2];
    float xs1[4][2];
    int64_t r[4];
    for (int64_t ch = cb; ch < ce; ++ch) {
      float* sg = &part[ch * C];
      float* sgx[2] = {&part[(nch + ch) * C], &part[(K * nch + ch) * C]};
      std::fill(sg, sg + C, 0.f);
      for (int k = 0; k < K; ++k) std::fill(sgx[k], sgx[k] + C, 0.f);
      auto add = [&](int64_t c, const Pair& g, const Pair* x) {
        (Vec::loadu(sg + c) + g.lo).store(sg + c);
        (Vec::loadu(sg + c + kV) + g.hi).store(sg + c + kV);
        for (int k = 0; k < K; ++k) {
          const Vec dlo = x[k].lo - Vec::loadu(&f.mean[k][c]), dhi = x[k].hi - Vec::loadu(&f.mean[k][c + kV]);
          at::vec::fmadd(g.lo, dlo, Vec::loadu(sgx[k] + c)).store(sgx[k] + c);
          at::vec::fmadd(g.hi, dhi, Vec::loadu(sgx[k] + c + kV)).store(sgx[k] + c + kV);
        }
      };
      auto add1 = [&](int64_t c, float g, const float* x) {
        sg[c] += g;
        for (int k = 0; k < K; ++k) sgx[k][c] += g * (x[k] - f.mean[k][c]);
      };
      for (int64_t u = ch * kChunk; u < std::min(units, (ch + 1) * kChunk); ++u) {
        if constexpr (POOL) {
          f.window_rows(u, r);
          int64_t c = 0;
          for (; c < Cv; c += kW) {
            Pair xsel[2];
            const Pair z = f.chosen(r, c, load_which(I + u * C + c), xs, xsel);
            add(c, f.grad_v(z, load(DY + u * C + c)), xsel);
          }
          for (; c < C; ++c) {
            const auto p = f.pick1(r, c, xs1);
            add1(c, act_grad1<A>(p.z, load1(DY + u * C + c), slope), xs1[p.which]);
          }
        } else {
          int64_t c = 0;
          for (; c < Cv; c += kW) {
            const Pair z = f.z_at(u, c, xs[0]);
            add(c, f.grad_v(z, load(DY + u * C + c)), xs[0]);
          }
          for (; c < C; ++c) {
            const float z = f.z_at1(u, c, xs1[0]);
            add1(c, act_grad1<A>(z, load1(DY + u * C + c), slope), xs1[0]);
          }
        }
      }
    }
  });
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dbias = at::empty({C}, fopt), dweight[2];
  std::vector<float> ca[2], cb[2], cc[2];
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t ch = 0; ch < nch; ++ch) sum += part[ch * C + c];
    dbias.data_ptr<float>()[c] = static_cast<float>(sum);
  }
  for (int k = 0; k < K; ++k) {
    dweight[k] = at::empty({C}, fopt);
    ca[k].resize(C);
    cb[k].resize(C);
    cc[k].resize(C);
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0;
      for (int64_t ch = 0; ch < nch; ++ch) sum += part[((1 + k) * nch + ch) * C + c];
      const double is = f.invstd[k][c], sgxh = sum * is;  // sum of g * xhat
      dweight[k].data_ptr<float>()[c] = static_cast<float>(sgxh);
      const double a = static_cast<double>(f.w[k][c]) * is;
      const double mg = static_cast<double>(dbias.data_ptr<float>()[c]) / s.M;
      const double b = -a * is * (sgxh / s.M);
      ca[k][c] = static_cast<float>(a);
      cb[k][c] = static_cast<float>(b);
      cc[k][c] = static_cast<float>(-a * mg - b * f.mean[k][c]);
    }
  }
  // Pass 2: dx_k at every row.
  at::Tensor dx[2];
  T* DX[2] = {nullptr, nullptr};
  for (int k = 0; k < K; ++k) {
    dx[k] = at::empty_like(x1, x1.options(), at::MemoryFormat::ChannelsLast);
    DX[k] = dx[k].data_ptr<T>();
  }
  auto put = [&](int64_t row, int64_t c, const Pair& g, const Pair* x) {
    for (int k = 0; k < K; ++k) {
      const Vec lo = at::vec::fmadd(g.lo, Vec::loadu(&ca[k][c]), at::vec::fmadd(x[k].lo, Vec::loadu(&cb[k][c]), Vec::loadu(&cc[k][c])));
      const Vec hi = at::vec::fmadd(g.hi, Vec::loadu(&ca[k][c + kV]),
                                    at::vec::fmadd(x[k].hi, Vec::loadu(&cb[k][c + kV]), Vec::loadu(&cc[k][c + kV])));
      store(DX[k] + row * C + c, Pair{lo, hi});
    }
  };
  auto put1 = [&](int64_t row, int64_t c, float g, const float* x) {
    for (int k = 0; k < K; ++k) store1(DX[k] + row * C + c, std::fma(g, ca[k][c], std::fma(x[k], cb[k][c], cc[k][c])));
  };
  if constexpr (POOL) {
    at::parallel_for(0, units, 16, [&](int64_t ub, int64_t ue) {
      Pair xs[4][2];
      float xs1[4][2];
      int64_t r[4];
      for (int64_t u = ub; u < ue; ++u) {
        f.window_rows(u, r);
        int64_t c = 0;
        for (; c < Cv; c += kW) {
          Pair xsel[2];
          const Pair which = load_which(I + u * C + c);
          const Pair g = f.grad_v(f.chosen(r, c, which, xs, xsel), load(DY + u * C + c));
          for (int q = 0; q < 4; ++q) {
            const Vec zero(0.f);
            const Pair gq{Vec::blendv(zero, g.lo, which.lo == Vec(float(q))),
                          Vec::blendv(zero, g.hi, which.hi == Vec(float(q)))};
            put(r[q], c, gq, xs[q]);
          }
        }
        for (; c < C; ++c) {
          const auto p = f.pick1(r, c, xs1);
          const float g = act_grad1<A>(p.z, load1(DY + u * C + c), slope);
          for (int q = 0; q < 4; ++q) put1(r[q], c, q == p.which ? g : 0.f, xs1[q]);
        }
      }
    });
    // Rows outside every window (the last row / column of an odd side): g = 0.
    if (s.H > 2 * s.Ho || s.W > 2 * s.Wo) {
      at::parallel_for(0, s.N * s.H, 16, [&](int64_t hb, int64_t he) {
        const Pair zero{Vec(0.f), Vec(0.f)};
        Pair xs[2];
        float xs1[2];
        for (int64_t nh = hb; nh < he; ++nh) {
          const int64_t h = nh % s.H;
          for (int64_t wi = h >= 2 * s.Ho ? 0 : 2 * s.Wo; wi < s.W; ++wi) {
            const int64_t row = nh * s.W + wi;
            int64_t c = 0;
            for (; c < Cv; c += kW) {
              f.z_at(row, c, xs);
              put(row, c, zero, xs);
            }
            for (; c < C; ++c) {
              f.z_at1(row, c, xs1);
              put1(row, c, 0.f, xs1);
            }
          }
        }
      });
    }
  } else {
    at::parallel_for(0, s.M, 64, [&](int64_t rb, int64_t re) {
      Pair xs[2];
      float xs1[2];
      for (int64_t r = rb; r < re; ++r) {
        int64_t c = 0;
        for (; c < Cv; c += kW) {
          const Pair z = f.z_at(r, c, xs);
          put(r, c, f.grad_v(z, load(DY + r * C + c)), xs);
        }
        for (; c < C; ++c) {
          const float z = f.z_at1(r, c, xs1);
          put1(r, c, act_grad1<A>(z, load1(DY + r * C + c), slope), xs1);
        }
      }
    });
  }
  if (TWO) return {dx[0], dweight[0], dbias, dx[1], dweight[1], dbias.clone()};
  return {dx[0], dweight[0], dbias};
}

// Run fn.template operator()<T, A, TWO, POOL>() for the call's types and options.
template <typename Fn>
std::vector<at::Tensor> dispatch(at::ScalarType dtype, int64_t act, bool two, bool pool, Fn&& fn) {
  auto with_pool = [&](auto t, auto a, auto tw) -> std::vector<at::Tensor> {
    using T = decltype(t);
    if (pool) return fn.template operator()<T, decltype(a)::value, decltype(tw)::value, true>();
    return fn.template operator()<T, decltype(a)::value, decltype(tw)::value, false>();
  };
  auto with_two = [&](auto t, auto a) -> std::vector<at::Tensor> {
    if (two) return with_pool(t, a, std::true_type{});
    return with_pool(t, a, std::false_type{});
  };
  auto with_act = [&](auto t) -> std::vector<at::Tensor> {
    if (act == kIdentity) return with_two(t, std::integral_constant<int, kIdentity>{});
    if (act == kRelu) return with_two(t, std::integral_constant<int, kRelu>{});
    return with_two(t, std::integral_constant<int, kLeaky>{});
  };
  if (dtype == at::kBFloat16) return with_act(c10::BFloat16{});
  return with_act(float{});
}

void check_call(const at::Tensor& x1, const c10::optional<at::Tensor>& x2, int64_t act, bool pool) {
  check_input(x1, "x1");
  TORCH_CHECK(act == kIdentity || act == kRelu || act == kLeaky,
              "act: expected 0 (identity), 1 (ReLU) or 2 (leaky ReLU), got ", act);
  TORCH_CHECK(x1.size(0) * x1.size(2) * x1.size(3) > 1, "x1: batch norm needs more than one value per channel");
  TORCH_CHECK(!pool || (x1.size(2) >= 2 && x1.size(3) >= 2), "x1: 2x2 pooling needs H, W >= 2, got ",
              x1.sizes());
  if (x2.has_value()) {
    check_input(*x2, "x2");
    TORCH_CHECK(x2->sizes() == x1.sizes() && x2->scalar_type() == x1.scalar_type(),
                "x2: expected the shape and dtype of x1");
  }
}

std::vector<at::Tensor> fused_forward(const at::Tensor& x1, const at::Tensor& w1, const at::Tensor& b1,
                                      const c10::optional<at::Tensor>& x2, const c10::optional<at::Tensor>& w2,
                                      const c10::optional<at::Tensor>& b2, double eps, int64_t act, double slope,
                                      bool pool) {
  check_call(x1, x2, act, pool);
  const bool two = x2.has_value();
  check_params(w1, b1, x1.size(1), "w1, b1");
  if (two) {
    TORCH_CHECK(w2.has_value() && b2.has_value(), "x2 needs w2 and b2");
    check_params(*w2, *b2, x1.size(1), "w2, b2");
  }
  const at::Tensor* w[2] = {&w1, two ? &*w2 : nullptr};
  const at::Tensor* b[2] = {&b1, two ? &*b2 : nullptr};
  const at::Tensor* x2p = two ? &*x2 : nullptr;
  const float sl = static_cast<float>(slope);
  return dispatch(x1.scalar_type(), act, two, pool, [&]<typename T, int A, bool TWO, bool POOL>() {
    return forward_impl<T, A, TWO, POOL>(x1, x2p, w, b, eps, sl);
  });
}

std::vector<at::Tensor> fused_backward(const at::Tensor& dy, const at::Tensor& x1, const at::Tensor& w1,
                                       const at::Tensor& b1, const at::Tensor& st1,
                                       const c10::optional<at::Tensor>& x2, const c10::optional<at::Tensor>& w2,
                                       const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& st2,
                                       const c10::optional<at::Tensor>& idx, int64_t act, double slope, bool pool) {
  check_call(x1, x2, act, pool);
  check_input(dy, "dy");
  const bool two = x2.has_value();
  const int64_t Ho = pool ? x1.size(2) / 2 : x1.size(2), Wo = pool ? x1.size(3) / 2 : x1.size(3);
  TORCH_CHECK(dy.size(0) == x1.size(0) && dy.size(1) == x1.size(1) && dy.size(2) == Ho && dy.size(3) == Wo &&
                  dy.scalar_type() == x1.scalar_type(),
              "dy: expected the forward output's shape and dtype, got ", dy.sizes());
  TORCH_CHECK(!two || (w2.has_value() && b2.has_value() && st2.has_value()), "x2 needs w2, b2 and st2");
  TORCH_CHECK(!pool || (idx.has_value() && idx->scalar_type() == at::kByte && idx->is_contiguous() &&
                        idx->numel() == x1.size(0) * Ho * Wo * x1.size(1)),
              "idx: expected the forward's argmax bytes (N, Ho, Wo, C) when pooling");
  const at::Tensor* w[2] = {&w1, two ? &*w2 : nullptr};
  const at::Tensor* b[2] = {&b1, two ? &*b2 : nullptr};
  const at::Tensor* st[2] = {&st1, two ? &*st2 : nullptr};
  const at::Tensor* x2p = two ? &*x2 : nullptr;
  const float sl = static_cast<float>(slope);
  return dispatch(x1.scalar_type(), act, two, pool, [&]<typename T, int A, bool TWO, bool POOL>() {
    return backward_impl<T, A, TWO, POOL>(dy, x1, x2p, w, b, st, pool ? &*idx : nullptr, sl);
  });
}

}  // namespace

TORCH_LIBRARY(negmargin_fused, m) {
  m.def(
      "forward(Tensor x1, Tensor w1, Tensor b1, Tensor? x2, Tensor? w2, Tensor? b2, float eps, int act, "
      "float slope, bool pool) -> Tensor[]",
      &fused_forward);
  m.def(
      "backward(Tensor dy, Tensor x1, Tensor w1, Tensor b1, Tensor st1, Tensor? x2, Tensor? w2, Tensor? b2, "
      "Tensor? st2, Tensor? idx, int act, float slope, bool pool) -> Tensor[]",
      &fused_backward);
}
