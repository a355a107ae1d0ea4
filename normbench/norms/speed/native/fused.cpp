// Fused CPU kernels for normbench's hand-written normalization layers (see native/__init__.py).
//
// The exported functions (extern "C", at the bottom) are declared once, in binding.py's KERNELS:
// the build generates their prototypes from that table and force-includes them in front of this
// file (g++ -include), so a definition here that differs from its declaration, or an export
// without one (-Werror=missing-declarations), fails to compile; ctypes takes its argument types
// from the same table. A changed parameter list is changed in both places.
//
// Every kernel works on a 4-d tensor seen as (B, C, S) with S = H * W, stored either NCHW
// (each (b, c) plane of S values contiguous) or NHWC / channels_last (each (b, s) row of C values
// contiguous), and on small per-(sample, channel) arrays of B * C values (index b * C + c) or
// per-channel arrays of C values. One pass over the big tensor per kernel; the loops are ordered
// so the innermost one runs along contiguous memory and vectorizes (#pragma omp simd); the outer
// loop is split over OpenMP threads (the process's pool: torch's libgomp, sized by
// torch.set_num_threads). Sums are accumulated in double (the NHWC gradient sums and FRN's mean
// square: in T over blocks of kRowBlock rows, then in double).
//
// Variances never come from raw sums of squares, which cancel catastrophically once a plane's
// mean is large against its spread (E[x^2] - mean^2 over float partial sums loses 1e-4 of the
// variance at a mean of 10 std, 1e-2 at 100 std): the moments are shifted sums, sum (x - k) and
// sum (x - k)^2 with k the plane's first element, so their accuracy does not depend on the offset
// (and a constant plane gives a variance of exactly 0); gradient sums that feed a centred
// quantity (sum g' x_hat) are taken about the centre, sum g' (x - centre), for the same reason.
//
// Kernels (T = float or double; "g'" is g where z > tau, 0 elsewhere, when z and tau are given,
// else g):
//   bc_moments   mean[b,c], var[b,c] = mean and biased variance over s of x
//   bc_affine    y = A[b,c] x + K[b,c], then max(y, tau[c]) when tau is given
//   bc_grad_sums sg[b,c] = sum_s g', sgx[b,c] = sum_s g' (x - m[b,c]) (m = 0 when not given),
//                sgraw[b,c] = sum_s g (optional)
//   bc_grad_out  gx = A[b,c] g' + K1[b,c] x + K0[b,c]
//   evo_forward  s = sigmoid(v[c] x) (stored for backward), z = x s A[b,c] + beta[c]
//   evo_grad_sums sgq[b,c] = sum_s g x s, sg[b,c] = sum_s g, sgv[b,c] = sum_s g x^2 s (1 - s)
//   evo_grad_out gx = g A[b,c] (s + v x s (1 - s)) + K1[b,c] x + K0[b,c]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements below which one thread does it all

// exp for float, vectorizable (no libm call): range reduction to [-ln2/2, ln2/2] and a
// degree-6 polynomial (Cephes expf coefficients), ~2 ulp; the input is clamped to [-87, 88].
inline float exp_approx(float x) {
    x = x < 88.0f ? x : 88.0f;  // two selects (fmin/fmax and nested ternaries stop gcc vectorizing)
    x = x > -87.0f ? x : -87.0f;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick, |t| < 2^22)
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);  // 2^n (a bit cast, so the loop still vectorizes)
}
inline double exp_approx(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + exp_approx(-x)); }

// NHWC reductions: three sums per channel over the S rows of one sample b, accumulated in Acc (T
// unless the caller asks for double) over blocks of kRowBlock rows and in double across blocks.
// Channels go in blocks of kLanes with fixed-size accumulators (they stay in vector registers); a
// channel count that kLanes does not divide takes the same loop with accumulators in memory.
// term(i, c, t1, t2, t3) adds element i (channel c) to the three sums.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kLanes = 16;

template <typename T, typename Acc = T, typename Term>
inline void nhwc_sums(int64_t b, int64_t C, int64_t S, Term term, double* o1, double* o2, double* o3) {
    if (C % kLanes == 0) {
        for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
            double d1[kLanes] = {}, d2[kLanes] = {}, d3[kLanes] = {};
            for (int64_t s0 = 0; s0 < S; s0 += kRowBlock) {
                Acc t1[kLanes] = {}, t2[kLanes] = {}, t3[kLanes] = {};
                const int64_t s1 = std::min(S, s0 + kRowBlock);
                for (int64_t s = s0; s < s1; ++s) {
                    const int64_t o = (b * S + s) * C + c0;
#pragma omp simd
                    for (int64_t l = 0; l < kLanes; ++l) term(o + l, c0 + l, t1[l], t2[l], t3[l]);
                }
                for (int64_t l = 0; l < kLanes; ++l) {
                    d1[l] += t1[l];
                    d2[l] += t2[l];
                    d3[l] += t3[l];
                }
            }
            for (int64_t l = 0; l < kLanes; ++l) {
                o1[c0 + l] = d1[l];
                o2[c0 + l] = d2[l];
                o3[c0 + l] = d3[l];
            }
        }
        return;
    }
    std::vector<Acc> t1(C), t2(C), t3(C);
    std::fill(o1, o1 + C, 0.0);
    std::fill(o2, o2 + C, 0.0);
    std::fill(o3, o3 + C, 0.0);
    for (int64_t s0 = 0; s0 < S; s0 += kRowBlock) {
        std::fill(t1.begin(), t1.end(), Acc(0));
        std::fill(t2.begin(), t2.end(), Acc(0));
        std::fill(t3.begin(), t3.end(), Acc(0));
        for (int64_t s = s0; s < std::min(S, s0 + kRowBlock); ++s) {
            const int64_t o = (b * S + s) * C;
            for (int64_t c = 0; c < C; ++c) term(o + c, c, t1[c], t2[c], t3[c]);
        }
        for (int64_t c = 0; c < C; ++c) {
            o1[c] += t1[c];
            o2[c] += t2[c];
            o3[c] += t3[c];
        }
    }
}

// NHWC element-wise maps: f(b, o, c0, n) handles the n contiguous channels c0 .. c0 + n - 1 of
// one row (element offset o) of sample b. With C a multiple of kLanes, n = kLanes (a compile-time
// trip count: one vector, no remainder handling per row), else n = C. The bodies below take
// restrict pointers to the row: gcc vectorizes selects (TLU clamps, masks) only that way.
template <typename F>
inline void nhwc_rows(int64_t B, int64_t C, int64_t S, F f) {
    if (C % kLanes == 0) {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t s = 0; s < S; ++s)
                for (int64_t c0 = 0; c0 < C; c0 += kLanes) f(b, (b * S + s) * C + c0, c0, std::integral_constant<int64_t, kLanes>());
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t s = 0; s < S; ++s) f(b, (b * S + s) * C, int64_t(0), C);
    }
}

// Per-(b, c) mean and biased variance, in double, from sums shifted by the plane's first element k
// (x[b, 0, c]): with d = x - k, mean = k + E[d], var = E[d^2] - E[d]^2, the sums in double in both
// layouts. In NHWC that costs about a third more time in this pass than float partial sums, which
// lose up to 2e-5 of the variance when k is an outlier (6 std out: the cancellation left is
// 1 + (mean - k)^2 / var, which does not depend on the offset and is harmless in double).
template <typename T>
void bc_moments_acc(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, double* mean, double* var) {
    const double inv_n = 1.0 / static_cast<double>(S);
    if (nhwc) {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b) {
            std::vector<double> acc(3 * C);
            double *a1 = acc.data(), *a2 = a1 + C, *a3 = a2 + C;
            const T* k = x + b * S * C;  // the sample's first row: one shift per channel
            nhwc_sums<T, double>(b, C, S, [x, k](int64_t i, int64_t c, double& t1, double& t2, double&) {
                const double d = x[i] - k[c];  // exact in T for x near k; its square exact in double
                t1 += d;
                t2 += d * d;
            }, a1, a2, a3);
            for (int64_t c = 0; c < C; ++c) {
                const double md = a1[c] * inv_n;
                const double q = a2[c] * inv_n - md * md;
                mean[b * C + c] = static_cast<double>(k[c]) + md;
                var[b * C + c] = q > 0.0 ? q : 0.0;
            }
        }
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T* p = x + bc * S;
            const double k = p[0];
            double a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
            for (int64_t s = 0; s < S; ++s) {
                const double d = static_cast<double>(p[s]) - k;
                a1 += d;
                a2 += d * d;
            }
            const double md = a1 * inv_n;
            const double q = a2 * inv_n - md * md;
            mean[bc] = k + md;
            var[bc] = q > 0.0 ? q : 0.0;
        }
    }
}

// Per-(b, c) mean of x^2 (FRN's nu^2): a sum of non-negative terms, which has no cancellation, so
// the NHWC loop keeps T partial sums (relative error below kRowBlock ulps, about 1e-7 typically).
template <typename T>
void bc_mean_sq(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, double* nu2) {
    const double inv_n = 1.0 / static_cast<double>(S);
    if (nhwc) {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b) {
            std::vector<double> acc(3 * C);
            double *a1 = acc.data(), *a2 = a1 + C, *a3 = a2 + C;
            nhwc_sums<T>(b, C, S, [x](int64_t i, int64_t, T& t1, T&, T&) { t1 += x[i] * x[i]; }, a1, a2, a3);
            for (int64_t c = 0; c < C; ++c) nu2[b * C + c] = a1[c] * inv_n;
        }
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T* p = x + bc * S;
            double a1 = 0.0;
#pragma omp simd reduction(+ : a1)
            for (int64_t s = 0; s < S; ++s) a1 += static_cast<double>(p[s]) * p[s];
            nu2[bc] = a1 * inv_n;
        }
    }
}

template <typename T>
void bc_moments(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, T* mean, T* var) {
    std::vector<double> m(B * C), q(B * C);
    bc_moments_acc<T>(x, B, C, S, nhwc, m.data(), q.data());
    for (int64_t i = 0; i < B * C; ++i) {
        mean[i] = static_cast<T>(m[i]);
        var[i] = static_cast<T>(q[i]);
    }
}

template <typename T>
void bc_affine(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* A, const T* K, const T* tau, T* y) {
    if (nhwc) {
        nhwc_rows(B, C, S, [=](int64_t b, int64_t o, int64_t c0, auto n) {
            const T* __restrict xr = x + o;
            const T* __restrict ar = A + b * C + c0;
            const T* __restrict kr = K + b * C + c0;
            T* __restrict yr = y + o;
            if (tau) {
                const T* __restrict tr = tau + c0;
#pragma omp simd
                for (int64_t l = 0; l < n; ++l) {
                    const T v = ar[l] * xr[l] + kr[l];
                    yr[l] = v > tr[l] ? v : tr[l];
                }
            } else {
#pragma omp simd
                for (int64_t l = 0; l < n; ++l) yr[l] = ar[l] * xr[l] + kr[l];
            }
        });
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T a = A[bc], k = K[bc];
            const T* p = x + bc * S;
            T* q = y + bc * S;
            if (tau) {
                const T t = tau[bc % C];
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) {
                    T v = a * p[s] + k;
                    q[s] = v > t ? v : t;
                }
            } else {
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) q[s] = a * p[s] + k;
            }
        }
    }
}

// sgx is taken about a per-(b, c) centre m when given (sum g' (x - m)): a layer that needs
// sum g' (x - mean) gets it without the cancellation of sum g' x - mean sum g'.
template <typename T>
void bc_grad_sums(const T* g, const T* x, const T* z, const T* tau, const T* center, int64_t B, int64_t C, int64_t S,
                  bool nhwc, T* sg, T* sgx, T* sgraw) {
    if (nhwc) {
        const std::vector<T> zero(center ? 0 : C, T(0));
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b) {
            std::vector<double> acc(3 * C);
            double *a1 = acc.data(), *a2 = a1 + C, *a3 = a2 + C;
            const T* m = center ? center + b * C : zero.data();
            if (z)
                nhwc_sums<T>(b, C, S, [g, x, z, tau, m](int64_t i, int64_t c, T& t1, T& t2, T& t3) {
                    const T gv = g[i];
                    const T gm = z[i] > tau[c] ? gv : T(0);
                    t1 += gm;
                    t2 += gm * (x[i] - m[c]);
                    t3 += gv;
                }, a1, a2, a3);
            else
                nhwc_sums<T>(b, C, S, [g, x, m](int64_t i, int64_t c, T& t1, T& t2, T&) {
                    const T gv = g[i];
                    t1 += gv;
                    t2 += gv * (x[i] - m[c]);
                }, a1, a2, a3);
            if (!z)
                for (int64_t c = 0; c < C; ++c) a3[c] = a1[c];
            for (int64_t c = 0; c < C; ++c) {
                sg[b * C + c] = static_cast<T>(a1[c]);
                sgx[b * C + c] = static_cast<T>(a2[c]);
                if (sgraw) sgraw[b * C + c] = static_cast<T>(a3[c]);
            }
        }
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const int64_t c = bc % C;
            const T* gp = g + bc * S;
            const T* xp = x + bc * S;
            const T* zp = z ? z + bc * S : nullptr;
            const T t = tau ? tau[c] : T(0);
            const double m = center ? static_cast<double>(center[bc]) : 0.0;
            double a1 = 0.0, a2 = 0.0, a3 = 0.0;
            if (zp) {
#pragma omp simd reduction(+ : a1, a2, a3)
                for (int64_t s = 0; s < S; ++s) {
                    double gv = gp[s];
                    double gm = zp[s] > t ? gv : 0.0;
                    a1 += gm;
                    a2 += gm * (static_cast<double>(xp[s]) - m);
                    a3 += gv;
                }
            } else {
#pragma omp simd reduction(+ : a1, a2)
                for (int64_t s = 0; s < S; ++s) {
                    double gv = gp[s];
                    a1 += gv;
                    a2 += gv * (static_cast<double>(xp[s]) - m);
                }
                a3 = a1;
            }
            sg[bc] = static_cast<T>(a1);
            sgx[bc] = static_cast<T>(a2);
            if (sgraw) sgraw[bc] = static_cast<T>(a3);
        }
    }
}

template <typename T>
void bc_grad_out(const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C, int64_t S, bool nhwc,
                 const T* A, const T* K1, const T* K0, T* gx) {
    if (nhwc) {
        nhwc_rows(B, C, S, [=](int64_t b, int64_t o, int64_t c0, auto n) {
            const T* __restrict gr = g + o;
            const T* __restrict xr = x + o;
            const T* __restrict ar = A + b * C + c0;
            const T* __restrict k1r = K1 + b * C + c0;
            const T* __restrict k0r = K0 + b * C + c0;
            T* __restrict out = gx + o;
            if (z) {
                const T* __restrict zr = z + o;
                const T* __restrict tr = tau + c0;
#pragma omp simd
                for (int64_t l = 0; l < n; ++l) out[l] = ar[l] * (zr[l] > tr[l] ? gr[l] : T(0)) + k1r[l] * xr[l] + k0r[l];
            } else {
#pragma omp simd
                for (int64_t l = 0; l < n; ++l) out[l] = ar[l] * gr[l] + k1r[l] * xr[l] + k0r[l];
            }
        });
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T a = A[bc], k1 = K1[bc], k0 = K0[bc];
            const T t = tau ? tau[bc % C] : T(0);
            const T* gp = g + bc * S;
            const T* xp = x + bc * S;
            const T* zp = z ? z + bc * S : nullptr;
            T* out = gx + bc * S;
            if (zp) {
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) out[s] = a * (zp[s] > t ? gp[s] : T(0)) + k1 * xp[s] + k0;
            } else {
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) out[s] = a * gp[s] + k1 * xp[s] + k0;
            }
        }
    }
}

template <typename T>
void evo_forward(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* v, const T* A, const T* beta,
                 T* z, T* sig) {
    if (nhwc) {
        nhwc_rows(B, C, S, [=](int64_t b, int64_t o, int64_t c0, auto n) {
            const T* __restrict xr = x + o;
            const T* __restrict vr = v + c0;
            const T* __restrict ar = A + b * C + c0;
            const T* __restrict br = beta + c0;
            T* __restrict zr = z + o;
            T* __restrict sr = sig + o;
#pragma omp simd
            for (int64_t l = 0; l < n; ++l) {
                const T sv = sigmoid(vr[l] * xr[l]);
                sr[l] = sv;
                zr[l] = xr[l] * sv * ar[l] + br[l];
            }
        });
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const int64_t c = bc % C;
            const T a = A[bc], vc = v[c], bt = beta[c];
            const T* p = x + bc * S;
            T* q = z + bc * S;
            T* sp = sig + bc * S;
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) {
                const T sv = sigmoid(vc * p[s]);
                sp[s] = sv;
                q[s] = p[s] * sv * a + bt;
            }
        }
    }
}

template <typename T>
void evo_grad_sums(const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, bool nhwc, T* sgq, T* sg,
                   T* sgv) {
    if (nhwc) {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t b = 0; b < B; ++b) {
            std::vector<double> acc(3 * C);
            double *a1 = acc.data(), *a2 = a1 + C, *a3 = a2 + C;
            nhwc_sums<T>(b, C, S, [g, x, sig](int64_t i, int64_t, T& t1, T& t2, T& t3) {
                const T xv = x[i], sv = sig[i], gv = g[i];
                const T gq = gv * xv * sv;
                t1 += gq;
                t2 += gv;
                t3 += gq * xv * (T(1) - sv);
            }, a1, a2, a3);
            for (int64_t c = 0; c < C; ++c) {
                sgq[b * C + c] = static_cast<T>(a1[c]);
                sg[b * C + c] = static_cast<T>(a2[c]);
                sgv[b * C + c] = static_cast<T>(a3[c]);
            }
        }
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T* gp = g + bc * S;
            const T* xp = x + bc * S;
            const T* sp = sig + bc * S;
            double a1 = 0.0, a2 = 0.0, a3 = 0.0;
#pragma omp simd reduction(+ : a1, a2, a3)
            for (int64_t s = 0; s < S; ++s) {
                const T xv = xp[s], sv = sp[s], gv = gp[s];
                const T gq = gv * xv * sv;
                a1 += static_cast<double>(gq);
                a2 += static_cast<double>(gv);
                a3 += static_cast<double>(gq * xv * (T(1) - sv));
            }
            sgq[bc] = static_cast<T>(a1);
            sg[bc] = static_cast<T>(a2);
            sgv[bc] = static_cast<T>(a3);
        }
    }
}

template <typename T>
void evo_grad_out(const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, bool nhwc, const T* v,
                  const T* A, const T* K1, const T* K0, T* gx) {
    if (nhwc) {
        nhwc_rows(B, C, S, [=](int64_t b, int64_t o, int64_t c0, auto n) {
            const T* __restrict gr = g + o;
            const T* __restrict xr = x + o;
            const T* __restrict sr = sig + o;
            const T* __restrict vr = v + c0;
            const T* __restrict ar = A + b * C + c0;
            const T* __restrict k1r = K1 + b * C + c0;
            const T* __restrict k0r = K0 + b * C + c0;
            T* __restrict out = gx + o;
#pragma omp simd
            for (int64_t l = 0; l < n; ++l) {
                const T xv = xr[l], sv = sr[l];
                out[l] = gr[l] * ar[l] * (sv + vr[l] * xv * sv * (T(1) - sv)) + k1r[l] * xv + k0r[l];
            }
        });
    } else {
#pragma omp parallel for if (B * C * S >= kParallelMin)
        for (int64_t bc = 0; bc < B * C; ++bc) {
            const T vc = v[bc % C], a = A[bc], k1 = K1[bc], k0 = K0[bc];
            const T* gp = g + bc * S;
            const T* xp = x + bc * S;
            const T* sp = sig + bc * S;
            T* out = gx + bc * S;
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) {
                const T xv = xp[s], sv = sp[s];
                out[s] = gp[s] * a * (sv + vc * xv * sv * (T(1) - sv)) + k1 * xv + k0;
            }
        }
    }
}

// FRN (+ TLU) in one call each way (Singh & Krishnan 2019, Eq. 1-4): the small per-(b, c)
// maths runs here too, so a layer costs one C call per direction (what matters at batch 2).
// Forward: inv[b,c] = 1 / sqrt(mean_s x^2 + eps), z = gamma inv x + beta (then max(z, tau)).
template <typename T>
void frn_forward(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* gamma, const T* beta, const T* tau,
                 double eps, T* inv, T* z) {
    std::vector<double> nu2(B * C);
    std::vector<T> a(B * C), k(B * C);
    bc_mean_sq<T>(x, B, C, S, nhwc, nu2.data());
    for (int64_t i = 0; i < B * C; ++i) {
        const int64_t c = i % C;
        inv[i] = static_cast<T>(1.0 / std::sqrt(nu2[i] + eps));
        a[i] = gamma[c] * inv[i];
        k[i] = beta[c];
    }
    bc_affine<T>(x, B, C, S, nhwc, a.data(), k.data(), tau, z);
}

// Backward, with g' = gz where z > tau (all of gz without a TLU) and N = S:
// dx = gamma inv g' - k x with k = gamma inv^3 sum_s(g' x) / N; dgamma = sum inv sum_s g' x;
// dbeta = sum g'; dtau = sum gz - dbeta; kout = k (for a learned eps: deps = -N/2 sum k).
template <typename T>
void frn_backward(const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C, int64_t S, bool nhwc,
                  const T* gamma, const T* inv, T* gx, T* dgamma, T* dbeta, T* dtau, T* kout) {
    std::vector<T> sg(B * C), sgx(B * C), sgraw(B * C), a(B * C), k1(B * C), k0(B * C, T(0));
    bc_grad_sums<T>(g, x, z, tau, nullptr, B, C, S, nhwc, sg.data(), sgx.data(), sgraw.data());
    std::vector<double> dg(C, 0.0), db(C, 0.0), dt(C, 0.0);
    for (int64_t i = 0; i < B * C; ++i) {
        const int64_t c = i % C;
        const double iv = inv[i];
        const double dot = static_cast<double>(sgx[i]) * iv;  // sum g' x_hat
        const double kk = gamma[c] * dot * iv * iv / static_cast<double>(S);
        a[i] = static_cast<T>(gamma[c] * iv);
        k1[i] = static_cast<T>(-kk);
        kout[i] = static_cast<T>(kk);
        dg[c] += dot;
        db[c] += sg[i];
        dt[c] += static_cast<double>(sgraw[i]) - sg[i];
    }
    for (int64_t c = 0; c < C; ++c) {
        dgamma[c] = static_cast<T>(dg[c]);
        dbeta[c] = static_cast<T>(db[c]);
        if (dtau) dtau[c] = static_cast<T>(dt[c]);
    }
    bc_grad_out<T>(g, x, z, tau, B, C, S, nhwc, a.data(), k1.data(), k0.data(), gx);
}

// Group moments from per-(b, c) moments m (mean), q (biased variance) (Chan et al.'s parallel
// variance over the C/G channels of each group): mean_g[b,g], rstd_g[b,g] = 1 / sqrt(var_g + eps);
// mu (optional): the group means unrounded, for the forward's affine constants.
template <typename T>
void group_moments(const double* m, const double* q, int64_t B, int64_t C, int64_t G, double eps, T* mean_g, T* rstd_g,
                   double* mu_out = nullptr) {
    const int64_t per = C / G;
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t base = (bg / G) * C + (bg % G) * per;
        double mu = 0.0, var = 0.0;
        for (int64_t j = 0; j < per; ++j) mu += m[base + j];
        mu /= static_cast<double>(per);
        for (int64_t j = 0; j < per; ++j) {
            const double dm = m[base + j] - mu;
            var += q[base + j] + dm * dm;
        }
        var /= static_cast<double>(per);
        mean_g[bg] = static_cast<T>(mu);
        rstd_g[bg] = static_cast<T>(1.0 / std::sqrt(var + eps));
        if (mu_out) mu_out[bg] = mu;
    }
}

// EvoNorm-S0 in one call each way (Liu et al. 2020): group moments from per-channel moments
// (Chan et al.'s parallel variance), rstd[b,g] = 1 / sqrt(var_g + eps), A[b,c] = gamma rstd;
// z = x sigmoid(v x) A + beta, or z = x A + beta without v (the no-activation variant).
template <typename T>
void evo_forward_full(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* v, const T* gamma,
                      const T* beta, int64_t G, double eps, T* mean_g, T* rstd_g, T* z, T* sig) {
    const int64_t per = C / G;
    std::vector<double> m(B * C), q(B * C);
    std::vector<T> a(B * C), k(B * C);
    bc_moments_acc<T>(x, B, C, S, nhwc, m.data(), q.data());
    group_moments<T>(m.data(), q.data(), B, C, G, eps, mean_g, rstd_g);
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t c0 = (bg % G) * per, base = (bg / G) * C + c0;
        const double rs = rstd_g[bg];
        for (int64_t j = 0; j < per; ++j) {
            a[base + j] = static_cast<T>(gamma[c0 + j] * rs);
            k[base + j] = beta[c0 + j];
        }
    }
    if (v)
        evo_forward<T>(x, B, C, S, nhwc, v, a.data(), beta, z, sig);
    else
        bc_affine<T>(x, B, C, S, nhwc, a.data(), k.data(), nullptr, z);
}

// Backward: with sgq = sum_s g q (q = x sigmoid(v x), or x), grstd[b,g] = sum_{c in g} gamma_c
// sgq[b,c] and kk = -grstd rstd^3 / (per S): dx = g A dq/dx + kk (x - mu_g); dgamma = sum sgq rstd;
// dbeta = sum g; dv = sum A sum_s g x^2 s (1 - s).
template <typename T>
void evo_backward_full(const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, bool nhwc, const T* v,
                       const T* gamma, int64_t G, const T* mean_g, const T* rstd_g, T* gx, T* dv, T* dgamma,
                       T* dbeta) {
    const int64_t per = C / G;
    std::vector<T> sgq(B * C), sg(B * C), sgv(B * C), a(B * C), k1(B * C), k0(B * C);
    if (v)
        evo_grad_sums<T>(g, x, sig, B, C, S, nhwc, sgq.data(), sg.data(), sgv.data());
    else
        bc_grad_sums<T>(g, x, nullptr, nullptr, nullptr, B, C, S, nhwc, sg.data(), sgq.data(), nullptr);
    std::vector<double> dvv(C, 0.0), dgg(C, 0.0), dbb(C, 0.0);
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t c0 = (bg % G) * per, base = (bg / G) * C + c0;
        const double rs = rstd_g[bg];
        double grstd = 0.0;
        for (int64_t j = 0; j < per; ++j) grstd += static_cast<double>(gamma[c0 + j]) * sgq[base + j];
        const double kk = -grstd * rs * rs * rs / static_cast<double>(per * S);
        for (int64_t j = 0; j < per; ++j) {
            const int64_t i = base + j, c = c0 + j;
            const double ai = gamma[c] * rs;
            a[i] = static_cast<T>(ai);
            k1[i] = static_cast<T>(kk);
            k0[i] = static_cast<T>(-kk * mean_g[bg]);
            dgg[c] += static_cast<double>(sgq[i]) * rs;
            dbb[c] += sg[i];
            if (v) dvv[c] += ai * sgv[i];
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        dgamma[c] = static_cast<T>(dgg[c]);
        dbeta[c] = static_cast<T>(dbb[c]);
        if (v && dv) dv[c] = static_cast<T>(dvv[c]);
    }
    if (v)
        evo_grad_out<T>(g, x, sig, B, C, S, nhwc, v, a.data(), k1.data(), k0.data(), gx);
    else
        bc_grad_out<T>(g, x, nullptr, nullptr, B, C, S, nhwc, a.data(), k1.data(), k0.data(), gx);
}

// GroupNorm (Wu & He 2018, Eq. 1-3; LayerNorm = 1 group, InstanceNorm = C groups) in one call
// each way: group moments from per-channel moments (parallel variance), rstd[b,g] =
// 1 / sqrt(var_g + eps), A[b,c] = gamma rstd, K[b,c] = beta - A mu_g; y = A x + K, or
// max(A x + K, 0) with ``relu`` (a fused ReLU). Writes mean_g, rstd_g (B x G).
template <typename T>
void gn_forward_full(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* gamma, const T* beta,
                     int64_t G, double eps, bool relu, T* mean_g, T* rstd_g, T* y) {
    const int64_t per = C / G;
    std::vector<double> m(B * C), q(B * C), mu_g(B * G);
    std::vector<T> a(B * C), k(B * C);
    bc_moments_acc<T>(x, B, C, S, nhwc, m.data(), q.data());
    group_moments<T>(m.data(), q.data(), B, C, G, eps, mean_g, rstd_g, mu_g.data());
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t c0 = (bg % G) * per, base = (bg / G) * C + c0;
        const double mu = mu_g[bg], rs = rstd_g[bg];
        for (int64_t j = 0; j < per; ++j) {
            const double aj = (gamma ? static_cast<double>(gamma[c0 + j]) : 1.0) * rs;
            a[base + j] = static_cast<T>(aj);
            k[base + j] = static_cast<T>((beta ? static_cast<double>(beta[c0 + j]) : 0.0) - aj * mu);
        }
    }
    std::vector<T> floor(relu ? C : 0, T(0));
    bc_affine<T>(x, B, C, S, nhwc, a.data(), k.data(), relu ? floor.data() : nullptr, y);
}

// Backward, with g' = g (or g where y > 0 after a fused ReLU: pass y), N = per S, per group
// S1 = sum_c gamma_c sum_s g', S2 = sum_c gamma_c sum_s g' x_hat: dx = A g' + K1 x + K0 with
// K1 = -rstd^2 S2 / N, K0 = -rstd S1 / N + mu rstd^2 S2 / N; dgamma = sum g' x_hat, dbeta = sum g'.
template <typename T>
void gn_backward_full(const T* g, const T* x, const T* y, int64_t B, int64_t C, int64_t S, bool nhwc,
                      const T* gamma, int64_t G, const T* mean_g, const T* rstd_g, T* gx, T* dgamma, T* dbeta) {
    const int64_t per = C / G;
    std::vector<T> sg(B * C), sgx(B * C), a(B * C), k1(B * C), k0(B * C), cen(B * C), floor(y ? C : 0, T(0));
    const T* fl = y ? floor.data() : nullptr;
    for (int64_t i = 0; i < B * C; ++i) cen[i] = mean_g[(i / C) * G + (i % C) / per];
    bc_grad_sums<T>(g, x, y, fl, cen.data(), B, C, S, nhwc, sg.data(), sgx.data(), nullptr);  // sgx about mu_g
    std::vector<double> dgg(C, 0.0), dbb(C, 0.0);
    const double n = static_cast<double>(per * S);
    for (int64_t bg = 0; bg < B * G; ++bg) {
        const int64_t c0 = (bg % G) * per, base = (bg / G) * C + c0;
        const double rs = rstd_g[bg], mu = mean_g[bg];
        double s1 = 0.0, s2 = 0.0;
        for (int64_t j = 0; j < per; ++j) {
            const int64_t i = base + j, c = c0 + j;
            const double gm = gamma ? static_cast<double>(gamma[c]) : 1.0;
            const double sgxh = static_cast<double>(sgx[i]) * rs;  // sum g' x_hat
            s1 += gm * sg[i];
            s2 += gm * sgxh;
            dgg[c] += sgxh;
            dbb[c] += sg[i];
        }
        const double kk1 = -rs * rs * s2 / n;
        const double kk0 = -rs * s1 / n - mu * kk1;
        for (int64_t j = 0; j < per; ++j) {
            const int64_t i = base + j;
            a[i] = static_cast<T>((gamma ? static_cast<double>(gamma[c0 + j]) : 1.0) * rs);
            k1[i] = static_cast<T>(kk1);
            k0[i] = static_cast<T>(kk0);
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        if (dgamma) dgamma[c] = static_cast<T>(dgg[c]);
        if (dbeta) dbeta[c] = static_cast<T>(dbb[c]);
    }
    bc_grad_out<T>(g, x, y, fl, B, C, S, nhwc, a.data(), k1.data(), k0.data(), gx);
}

// Chunked BatchNorm (BatchNorm = one chunk; Ghost BN; Batch Renorm with one chunk) in one call
// each way. Chunk j holds samples [start[j], start[j+1]). Per chunk and channel: mu, var (biased)
// from per-(b, c) moments (parallel variance), rstd = 1 / sqrt(var + eps); Batch Renorm (run_std
// given, limits r_lim, d_lim): r = clip(sqrt(var + eps) / run_std, 1/r_lim, r_lim),
// d = clip((mu - run_mean) / run_std, -d_lim, d_lim), A = gamma r rstd, K = beta + gamma (d - r
// rstd mu); else A = gamma rstd, K = beta - A mu. y = A x + K, or max(A x + K, 0) with ``relu``.
// stats (6 x K x C, written): mu, var, rstd, A, r, d (r, d only for Batch Renorm).
// Running statistics, updated in place at rate ``momentum`` after r and d used the old values:
// update_mode 1 (Batch Renorm): upd_mean -> mu, upd_second (a std) -> sqrt(var + eps);
// update_mode 2 (BatchNorm, Ghost BN once per step): upd_mean -> sum_j w_j mu_j, upd_second (a
// variance) -> sum_j w_j var_j N_j / (N_j - 1), w_j = n_j / B, N_j = n_j S (the unbiased chunk
// variance, as PyTorch's BatchNorm). ``counter`` (optional): an int64 step counter, incremented.
template <typename T>
void cbn_forward(const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const T* gamma, const T* beta,
                 const int64_t* start, int64_t K, double eps, const T* run_mean, const T* run_std, const T* r_lim_p,
                 const T* d_lim_p, T* upd_mean, T* upd_second, int update_mode, double momentum, bool relu,
                 int64_t* counter, T* y, T* stats) {
    const int64_t KC = K * C;
    T *mu = stats, *var = stats + KC, *rstd = stats + 2 * KC, *A = stats + 3 * KC, *r = stats + 4 * KC,
      *d = stats + 5 * KC;
    const double r_lim = r_lim_p ? static_cast<double>(*r_lim_p) : 1.0;
    const double d_lim = d_lim_p ? static_cast<double>(*d_lim_p) : 0.0;
    std::vector<T> ab(B * C), kb(B * C);
    std::vector<double> m(B * C), q(B * C), new_mean(C, 0.0), new_second(C, 0.0);
    bc_moments_acc<T>(x, B, C, S, nhwc, m.data(), q.data());
    for (int64_t j = 0; j < K; ++j) {
        const int64_t b0 = start[j], b1 = start[j + 1];
        const double n = static_cast<double>(b1 - b0);
        for (int64_t c = 0; c < C; ++c) {
            double mm = 0.0, vv = 0.0;
            for (int64_t b = b0; b < b1; ++b) mm += m[b * C + c];
            mm /= n;
            for (int64_t b = b0; b < b1; ++b) {
                const double dm = m[b * C + c] - mm;
                vv += q[b * C + c] + dm * dm;
            }
            vv /= n;
            const double rs = 1.0 / std::sqrt(vv + eps);
            const int64_t i = j * C + c;
            double a, kk;
            if (run_std) {
                double rr = std::sqrt(vv + eps) / run_std[c];
                rr = rr < 1.0 / r_lim ? 1.0 / r_lim : (rr > r_lim ? r_lim : rr);
                double dd = (mm - run_mean[c]) / run_std[c];
                dd = dd < -d_lim ? -d_lim : (dd > d_lim ? d_lim : dd);
                a = gamma[c] * rr * rs;
                kk = beta[c] + gamma[c] * (dd - rr * rs * mm);
                r[i] = static_cast<T>(rr);
                d[i] = static_cast<T>(dd);
            } else {
                a = gamma[c] * rs;
                kk = beta[c] - a * mm;
            }
            mu[i] = static_cast<T>(mm);
            var[i] = static_cast<T>(vv);
            rstd[i] = static_cast<T>(rs);
            A[i] = static_cast<T>(a);
            for (int64_t b = b0; b < b1; ++b) {
                ab[b * C + c] = static_cast<T>(a);
                kb[b * C + c] = static_cast<T>(kk);
            }
            const double w = n / static_cast<double>(B), nn = n * static_cast<double>(S);
            new_mean[c] += w * mm;
            new_second[c] += update_mode == 1 ? w * std::sqrt(vv + eps) : w * vv * nn / (nn - 1.0);
        }
    }
    if (update_mode != 0)
        for (int64_t c = 0; c < C; ++c) {
            upd_mean[c] += static_cast<T>(momentum * (new_mean[c] - upd_mean[c]));
            upd_second[c] += static_cast<T>(momentum * (new_second[c] - upd_second[c]));
        }
    if (counter) *counter += 1;
    std::vector<T> floor(relu ? C : 0, T(0));
    bc_affine<T>(x, B, C, S, nhwc, ab.data(), kb.data(), relu ? floor.data() : nullptr, y);
}

// Backward (r, d constants): per chunk and channel with N = n_j S, sg = sum g', sgxh = sum g' x_hat
// (g' = g, or g where y > 0 after a fused ReLU: pass y): dx = A (g' - sg / N - x_hat sgxh / N);
// dgamma = sum (r sgxh + d sg) (r = 1, d = 0 without renorm); dbeta = sum sg.
template <typename T>
void cbn_backward(const T* g, const T* x, int64_t B, int64_t C, int64_t S, bool nhwc, const int64_t* start, int64_t K,
                  const T* stats, bool renorm, const T* y, T* gx, T* dgamma, T* dbeta) {
    const int64_t KC = K * C;
    const T *mu = stats, *rstd = stats + 2 * KC, *A = stats + 3 * KC, *r = stats + 4 * KC, *d = stats + 5 * KC;
    std::vector<T> sgb(B * C), sgxb(B * C), ab(B * C), k1(B * C), k0(B * C), cen(B * C), floor(y ? C : 0, T(0));
    const T* fl = y ? floor.data() : nullptr;
    for (int64_t j = 0; j < K; ++j)
        for (int64_t b = start[j]; b < start[j + 1]; ++b) std::copy(mu + j * C, mu + (j + 1) * C, cen.begin() + b * C);
    bc_grad_sums<T>(g, x, y, fl, cen.data(), B, C, S, nhwc, sgb.data(), sgxb.data(), nullptr);  // sgx about mu_j
    std::vector<double> dg(C, 0.0), db(C, 0.0);
    for (int64_t j = 0; j < K; ++j) {
        const int64_t b0 = start[j], b1 = start[j + 1];
        const double n = static_cast<double>((b1 - b0) * S);
        for (int64_t c = 0; c < C; ++c) {
            const int64_t i = j * C + c;
            double sg = 0.0, sgx = 0.0;
            for (int64_t b = b0; b < b1; ++b) {
                sg += sgb[b * C + c];
                sgx += sgxb[b * C + c];
            }
            const double rs = rstd[i], mm = mu[i], a = A[i];
            const double sgxh = rs * sgx;  // sum g' x_hat (the sums are about mu_j)
            const double mgx = sgxh / n;
            const double kk1 = -a * rs * mgx;
            const double kk0 = -a * (sg / n - rs * mm * mgx);
            for (int64_t b = b0; b < b1; ++b) {
                ab[b * C + c] = A[i];
                k1[b * C + c] = static_cast<T>(kk1);
                k0[b * C + c] = static_cast<T>(kk0);
            }
            dg[c] += renorm ? r[i] * sgxh + d[i] * sg : sgxh;
            db[c] += sg;
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        dgamma[c] = static_cast<T>(dg[c]);
        dbeta[c] = static_cast<T>(db[c]);
    }
    bc_grad_out<T>(g, x, y, fl, B, C, S, nhwc, ab.data(), k1.data(), k0.data(), gx);
}

}  // namespace

#define NB_EXPORT(T, SUFFIX)                                                                                     \
    extern "C" void bc_moments_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, T* mean, T* var) { \
        bc_moments<T>(x, B, C, S, nhwc != 0, mean, var);                                                         \
    }                                                                                                            \
    extern "C" void bc_affine_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* A,         \
                                       const T* K, const T* tau, T* y) {                                         \
        bc_affine<T>(x, B, C, S, nhwc != 0, A, K, tau, y);                                                       \
    }                                                                                                            \
    extern "C" void bc_grad_sums_##SUFFIX(const T* g, const T* x, const T* z, const T* tau, const T* center,      \
                                          int64_t B, int64_t C, int64_t S, int nhwc, T* sg, T* sgx, T* sgraw) {  \
        bc_grad_sums<T>(g, x, z, tau, center, B, C, S, nhwc != 0, sg, sgx, sgraw);                               \
    }                                                                                                            \
    extern "C" void bc_grad_out_##SUFFIX(const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C,  \
                                         int64_t S, int nhwc, const T* A, const T* K1, const T* K0, T* gx) {      \
        bc_grad_out<T>(g, x, z, tau, B, C, S, nhwc != 0, A, K1, K0, gx);                                         \
    }                                                                                                            \
    extern "C" void evo_forward_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* v,       \
                                         const T* A, const T* beta, T* z, T* sig) {                              \
        evo_forward<T>(x, B, C, S, nhwc != 0, v, A, beta, z, sig);                                               \
    }                                                                                                            \
    extern "C" void evo_grad_sums_##SUFFIX(const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, \
                                           int nhwc, T* sgq, T* sg, T* sgv) {                                    \
        evo_grad_sums<T>(g, x, sig, B, C, S, nhwc != 0, sgq, sg, sgv);                                           \
    }                                                                                                            \
    extern "C" void evo_grad_out_##SUFFIX(const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S,  \
                                          int nhwc, const T* v, const T* A, const T* K1, const T* K0, T* gx) {   \
        evo_grad_out<T>(g, x, sig, B, C, S, nhwc != 0, v, A, K1, K0, gx);                                        \
    }

#define NB_EXPORT_FRN(T, SUFFIX)                                                                                 \
    extern "C" void frn_forward_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* gamma,   \
                                         const T* beta, const T* tau, double eps, T* inv, T* z) {                \
        frn_forward<T>(x, B, C, S, nhwc != 0, gamma, beta, tau, eps, inv, z);                                    \
    }                                                                                                            \
    extern "C" void frn_backward_##SUFFIX(const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C, \
                                          int64_t S, int nhwc, const T* gamma, const T* inv, T* gx, T* dgamma,    \
                                          T* dbeta, T* dtau, T* kout) {                                          \
        frn_backward<T>(g, x, z, tau, B, C, S, nhwc != 0, gamma, inv, gx, dgamma, dbeta, dtau, kout);            \
    }

#define NB_EXPORT_FULL(T, SUFFIX)                                                                                \
    extern "C" void evo_forward_full_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* v,  \
                                              const T* gamma, const T* beta, int64_t G, double eps, T* mean_g,   \
                                              T* rstd_g, T* z, T* sig) {                                         \
        evo_forward_full<T>(x, B, C, S, nhwc != 0, v, gamma, beta, G, eps, mean_g, rstd_g, z, sig);              \
    }                                                                                                            \
    extern "C" void evo_backward_full_##SUFFIX(const T* g, const T* x, const T* sig, int64_t B, int64_t C,        \
                                               int64_t S, int nhwc, const T* v, const T* gamma, int64_t G,        \
                                               const T* mean_g, const T* rstd_g, T* gx, T* dv, T* dgamma,         \
                                               T* dbeta) {                                                       \
        evo_backward_full<T>(g, x, sig, B, C, S, nhwc != 0, v, gamma, G, mean_g, rstd_g, gx, dv, dgamma, dbeta); \
    }                                                                                                            \
    extern "C" void cbn_forward_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* gamma,   \
                                         const T* beta, const int64_t* start, int64_t K, double eps,             \
                                         const T* run_mean, const T* run_std, const T* r_lim, const T* d_lim,    \
                                         T* upd_mean, T* upd_second, int update_mode, double momentum, int relu, \
                                         int64_t* counter, T* y, T* stats) {                                     \
        cbn_forward<T>(x, B, C, S, nhwc != 0, gamma, beta, start, K, eps, run_mean, run_std, r_lim, d_lim,       \
                       upd_mean, upd_second, update_mode, momentum, relu != 0, counter, y, stats);               \
    }                                                                                                            \
    extern "C" void cbn_backward_##SUFFIX(const T* g, const T* x, int64_t B, int64_t C, int64_t S, int nhwc,      \
                                          const int64_t* start, int64_t K, const T* stats, int renorm,           \
                                          const T* y, T* gx, T* dgamma, T* dbeta) {                              \
        cbn_backward<T>(g, x, B, C, S, nhwc != 0, start, K, stats, renorm != 0, y, gx, dgamma, dbeta);           \
    }

#define NB_EXPORT_GN(T, SUFFIX)                                                                                  \
    extern "C" void gn_forward_full_##SUFFIX(const T* x, int64_t B, int64_t C, int64_t S, int nhwc,               \
                                             const T* gamma, const T* beta, int64_t G, double eps, int relu,     \
                                             T* mean_g, T* rstd_g, T* y) {                                       \
        gn_forward_full<T>(x, B, C, S, nhwc != 0, gamma, beta, G, eps, relu != 0, mean_g, rstd_g, y);            \
    }                                                                                                            \
    extern "C" void gn_backward_full_##SUFFIX(const T* g, const T* x, const T* y, int64_t B, int64_t C,          \
                                              int64_t S, int nhwc, const T* gamma, int64_t G, const T* mean_g,   \
                                              const T* rstd_g, T* gx, T* dgamma, T* dbeta) {                     \
        gn_backward_full<T>(g, x, y, B, C, S, nhwc != 0, gamma, G, mean_g, rstd_g, gx, dgamma, dbeta);           \
    }

NB_EXPORT_GN(float, f32)
NB_EXPORT_GN(double, f64)
NB_EXPORT_FULL(float, f32)
NB_EXPORT_FULL(double, f64)
NB_EXPORT_FRN(float, f32)
NB_EXPORT_FRN(double, f64)
NB_EXPORT(float, f32)
NB_EXPORT(double, f64)
