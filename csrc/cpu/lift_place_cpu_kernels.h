// The CPU kernels' row loops, included twice by lift_place_cpu.cpp: once for the baseline
// ISA and once under `#pragma GCC target("avx2")`, each time inside its own namespace. No
// include guard on purpose. AVX2 without FMA: the vectorised lanes round exactly like the
// scalar ones, so both builds give bitwise identical results.

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

inline double sign(double v) { return static_cast<double>((v > 0) - (v < 0)); }  // sign(NaN) = 0, as torch

// ---------------------------------------------------------------------------------------
// Error ranking: a stable LSD radix sort of the bits of e = (y - x)^2.
//
// Why radix: e >= 0, so its IEEE bits already order like the values, and an LSD radix
// sort is stable, so ties go to the lower index for free. It is several times faster than
// std::sort on packed (key, index) pairs (docs/KERNELS.md). Float64 uses the same code on
// 63-bit keys (more passes, same guarantees) rather than a second algorithm.
template <typename acc_t>
struct KeyBits;
template <>
struct KeyBits<float> {
  using U = uint32_t;
  static constexpr int kBits = 31;
  static constexpr U kInf = 0x7f800000u, kNaN = 0x7fc00000u;
};
template <>
struct KeyBits<double> {
  using U = uint64_t;
  static constexpr int kBits = 63;
  static constexpr U kInf = 0x7ff0000000000000ull, kNaN = 0x7ff8000000000000ull;
};

template <typename acc_t>
inline typename KeyBits<acc_t>::U bits_of(acc_t v) {
  typename KeyBits<acc_t>::U u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// The key is kept as an acc_t with cleaned bits (read back through bits_of). A NaN may carry
// the sign bit and any payload; torch.sort treats all NaNs as equal and largest, so map them
// to one NaN above +inf: NaNs then rank last, ties by index, exactly like the twin.
template <typename acc_t>
inline acc_t error_key(acc_t e) {
  using KB = KeyBits<acc_t>;
  typename KB::U u = bits_of(e) & ~(typename KB::U(1) << KB::kBits);
  u = u > KB::kInf ? KB::kNaN : u;
  acc_t k;
  std::memcpy(&k, &u, sizeof k);
  return k;
}

// The widest digit: 10 bits from 1024 up to 2048 elements, 11 from 4096 on (with the live
// range usually 27-30 bits wide, both give 3 passes; 8 bits, 4 passes, measured slower at
// 1024). A pass costs two sweeps of its 2^w-bucket histogram besides the n elements, so
// shorter rows take narrower digits, about log2(n) bits (6 at the least), and more passes:
// at n = 64 a 10-bit pass spent 32 of its 33 parts on the histogram. Never so narrow that
// a key_bits-wide key needs more than kMaxPasses passes (64-bit keys: 8 bits).
constexpr int kMaxPasses = 8;
inline int max_digit_bits(int64_t n, int key_bits) {
  int w = n > 2048 ? 11 : n >= 1024 ? 10 : 6;
  if (n < 1024)
    while (w < 10 && (int64_t(1) << w) < n) ++w;
  return std::max(w, (key_bits + kMaxPasses - 1) / kMaxPasses);
}

// Rows this short skip the radix sort: a stable insertion sort of the indices by key (at most
// n^2/4 = 256 moves) costs less than even one radix pass's histogram.
constexpr int64_t kInsertionSortMax = 32;

template <typename U, typename Idx>
inline void insertion_sort_by_key(const U* key, Idx* idx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<Idx>(i);
  for (int64_t i = 1; i < n; ++i) {
    const Idx v = idx[i];
    const U kv = key[v];
    int64_t j = i;
    for (; j > 0 && key[idx[j - 1]] > kv; --j) idx[j] = idx[j - 1];  // strictly greater: ties keep index order
    idx[j] = v;
  }
}

template <typename U>
inline int bit_width_of(U v) {
  int b = 0;
  for (; v != 0; v >>= 1) ++b;
  return b;
}

// The LSD passes over the live bits of the keys. The caller has subtracted the row's
// smallest key (keys are unsigned and order like the errors, so k - min keeps order and
// ties), leaving keys < 2^bits: only those bits are sorted, split into as few passes as
// the widest digit allows, of near-equal widths (smaller histograms than fixed digits).
struct DigitPlan {
  int passes = 0;
  int shift[kMaxPasses];
  int width[kMaxPasses];
};

inline DigitPlan plan_digits(int bits, int max_digit) {
  DigitPlan d;
  d.passes = (bits + max_digit - 1) / max_digit;
  int shift = 0;
  for (int p = 0; p < d.passes; ++p) {
    d.width[p] = bits / d.passes + (p < bits % d.passes ? 1 : 0);
    d.shift[p] = shift;
    shift += d.width[p];
  }
  return d;
}

// Subtracts the row's smallest key from every key and counts the lowest digit.
template <typename U>
inline void rebase_and_count(U* key, U lo, uint32_t* h, U mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const U k = key[i] - lo;
    key[i] = k;
    ++h[k & mask];
  }
}

template <typename U>
inline void count_digit(const U* ks, uint32_t* h, int shift, U mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ++h[(ks[i] >> shift) & mask];
}

// Exclusive prefix sum of a histogram; false (and left as counts) when one bucket holds all
// n keys, i.e. the pass would not move anything.
inline bool offsets(uint32_t* h, int64_t buckets, uint32_t first, int64_t n) {
  if (h[first] == static_cast<uint32_t>(n)) return false;
  uint32_t run = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    const uint32_t c = h[b];
    h[b] = run;
    run += c;
  }
  return true;
}

// One stable counting-sort pass: element i (key ks[i], index is[i], or i when is == nullptr)
// goes to position off[digit]++; the next pass's digit is counted on the way (nh), which
// costs less than a separate histogram loop over all digits (measured).
template <typename U, typename Idx>
inline void scatter_pass(const U* ks, const Idx* is, U* kd, Idx* id, uint32_t* off, int shift, U mask,
                         uint32_t* nh, int nshift, U nmask, int64_t n) {
  if (is == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const U k = ks[i];
      const uint32_t pos = off[(k >> shift) & mask]++;
      ++nh[(k >> nshift) & nmask];
      kd[pos] = k;
      id[pos] = static_cast<Idx>(i);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const U k = ks[i];
      const uint32_t pos = off[(k >> shift) & mask]++;
      ++nh[(k >> nshift) & nmask];
      kd[pos] = k;
      id[pos] = is[i];
    }
  }
}

// The last pass writes only the order (the keys are no longer needed).
template <typename U, typename Idx>
inline void last_pass(const U* ks, const Idx* is, Idx* id, uint32_t* off, int shift, U mask, int64_t n) {
  if (is == nullptr) {
    for (int64_t i = 0; i < n; ++i) id[off[(ks[i] >> shift) & mask]++] = static_cast<Idx>(i);
  } else {
    for (int64_t i = 0; i < n; ++i) id[off[(ks[i] >> shift) & mask]++] = is[i];
  }
}

// ---------------------------------------------------------------------------------------
// Forward: gather each group, two-pass (centred) fit, the row's 7 statistics.

// Sums run in independent double partials combined in a fixed order: the compiler may not
// reorder float adds, so one accumulator would serialise on the add latency, and a fixed
// order keeps results independent of the thread count. Short groups are fitted kLanes
// groups at a time (one partial per group); long runs spread over kSumLanes partials.
constexpr int kLanes = 4;
constexpr int kSumLanes = 8;

template <typename acc_t, typename T>
inline double as_double(T v) {
  return static_cast<double>(static_cast<acc_t>(v));
}

// sum_{i<n} term(i): element i in partial i % kSumLanes, the tail in its own sum (a partial
// picked at run time would push them all out of registers).
template <typename Term>
inline double lane_sum(int64_t n, Term&& term) {
  double p[kSumLanes] = {}, tail = 0;
  const int64_t body = n - n % kSumLanes;
  for (int64_t i = 0; i < body; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) p[l] += term(i + l);
  for (int64_t i = body; i < n; ++i) tail += term(i);
  static_assert(kSumLanes == 8, "the combine below is written for 8 partials");
  return (((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))) + tail;
}

template <typename acc_t, typename scalar_t>
inline double sum_sq_diff(const scalar_t* x, const scalar_t* y, int64_t n) {
  return lane_sum(n, [&](int64_t i) {
    const acc_t d = static_cast<acc_t>(y[i]) - static_cast<acc_t>(x[i]);
    return static_cast<double>(d * d);
  });
}

template <typename acc_t>
inline void store_group(double a, double b, double mx, double my, double d, double fine, int64_t n, int64_t g,
                        bool l2, const FwdRow<acc_t>& out, RowSums& rs) {
  const double coarse = l2 ? (a - 1) * (a - 1) + b * b : std::abs(a - 1) + std::abs(b);
  rs.coarse += n * coarse;
  rs.fine += fine;
  rs.absdev += std::abs(a - 1);
  rs.absb += std::abs(b);
  rs.suma += a;
  rs.sumb += b;
  out.slope[g] = static_cast<acc_t>(a);
  out.intercept[g] = static_cast<acc_t>(b);
  out.aux[aux_at(g, kMeanX)] = static_cast<acc_t>(mx);
  out.aux[aux_at(g, kMeanY)] = static_cast<acc_t>(my);
  out.aux[aux_at(g, kDenom)] = static_cast<acc_t>(d);
}

// Centred (two-pass) fit of L groups of n values each, interleaved so that value j of
// group g0 + l sits at [j * L + l]: lane = group, and the lane loops vectorise. Each lane
// sums its group in rank order, so the result does not depend on L; L = 16 gives four
// independent vector chains, which hides the add latency that bounds L = 4 (measured).
// The values are in L1 after the gather, so the second pass is nearly free and fp32
// inputs with |mean| >> std keep their accuracy (never E[x^2] - E[x]^2).
template <int L, typename acc_t>
inline void fit_lanes(const double* bx, const double* by, int64_t n, int64_t g0, double eps, bool l2,
                      const FwdRow<acc_t>& out, RowSums& rs) {
  double mx[L] = {}, my[L] = {};
  for (int64_t j = 0; j < n; ++j) {
    for (int l = 0; l < L; ++l) {
      mx[l] += bx[j * L + l];
      my[l] += by[j * L + l];
    }
  }
  for (int l = 0; l < L; ++l) {
    mx[l] /= n;
    my[l] /= n;
  }
  double sxx[L] = {}, sxy[L] = {};
  for (int64_t j = 0; j < n; ++j) {
    for (int l = 0; l < L; ++l) {
      const double dx = bx[j * L + l] - mx[l], dy = by[j * L + l] - my[l];
      sxx[l] += dx * dx;
      sxy[l] += dx * dy;
    }
  }
  double d[L], a[L], fine[L] = {};
  for (int l = 0; l < L; ++l) {
    d[l] = sxx[l] / n + eps;
    a[l] = sxy[l] / n / d[l];
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int l = 0; l < L; ++l) {
      const double r = a[l] * (bx[j * L + l] - mx[l]) - (by[j * L + l] - my[l]);
      fine[l] += r * r;
    }
  }
  for (int l = 0; l < L; ++l)
    store_group(a[l], my[l] - a[l] * mx[l], mx[l], my[l], d[l], fine[l], n, g0 + l, l2, out, rs);
}

// The same fit for one contiguous group (global rows, ragged or left-over groups). One
// lane_sum per moment: measured faster than fusing them, as each loop vectorises alone.
template <typename acc_t, typename T>
inline void fit_one(const T* gx, const T* gy, int64_t n, int64_t g, double eps, bool l2, const FwdRow<acc_t>& out,
                    RowSums& rs) {
  auto X = [&](int64_t i) { return as_double<acc_t>(gx[i]); };
  auto Y = [&](int64_t i) { return as_double<acc_t>(gy[i]); };
  const double mx = lane_sum(n, X) / n;
  const double my = lane_sum(n, Y) / n;
  const double sxx = lane_sum(n, [&](int64_t i) {
    const double dx = X(i) - mx;
    return dx * dx;
  });
  const double sxy = lane_sum(n, [&](int64_t i) { return (X(i) - mx) * (Y(i) - my); });
  const double d = sxx / n + eps;
  const double a = sxy / n / d;
  const double fine = lane_sum(n, [&](int64_t i) {
    const double r = a * (X(i) - mx) - (Y(i) - my);
    return r * r;
  });
  store_group(a, my - a * mx, mx, my, d, fine, n, g, l2, out, rs);
}

// Fits groups 0..G-1 (P values each, the last n_last). gather(g, n, dst_x, dst_y, stride)
// writes group g's values as doubles to dst[j * stride]; only kWideLanes groups are staged
// at a time, so the scratch stays in L1. Full groups go kWideLanes, then kLanes at a time;
// the rest one by one (fit_one sums in another order, so which groups take it is fixed:
// all but the first kLanes * floor(full / kLanes) groups, as before kWideLanes existed).
constexpr int kWideLanes = 16;
template <typename acc_t, typename Gather>
inline void fit_row(int64_t G, int64_t P, int64_t n_last, Gather&& gather, double* bx, double* by, double eps,
                    bool l2, const FwdRow<acc_t>& out, RowSums& rs) {
  const int64_t full = n_last == P ? G : G - 1;
  int64_t g = 0;
  for (; g + kWideLanes <= full; g += kWideLanes) {
    for (int l = 0; l < kWideLanes; ++l) gather(g + l, P, bx + l, by + l, kWideLanes);
    fit_lanes<kWideLanes>(bx, by, P, g, eps, l2, out, rs);
  }
  for (; g + kLanes <= full; g += kLanes) {
    for (int l = 0; l < kLanes; ++l) gather(g + l, P, bx + l, by + l, kLanes);
    fit_lanes<kLanes>(bx, by, P, g, eps, l2, out, rs);
  }
  for (; g < G; ++g) {
    const int64_t n = g == G - 1 ? n_last : P;
    gather(g, n, bx, by, 1);
    fit_one<acc_t>(bx, by, n, g, eps, l2, out, rs);
  }
}

template <typename acc_t>
inline void store_row(acc_t* rows, const RowSums& rs) {
  rows[kCoarse] = static_cast<acc_t>(rs.coarse);
  rows[kFine] = static_cast<acc_t>(rs.fine);
  rows[kSqErr] = static_cast<acc_t>(rs.sqerr);
  rows[kAbsSlopeDev] = static_cast<acc_t>(rs.absdev);
  rows[kAbsIntercept] = static_cast<acc_t>(rs.absb);
  rows[kSumSlope] = static_cast<acc_t>(rs.suma);
  rows[kSumIntercept] = static_cast<acc_t>(rs.sumb);
}

// Row r's groups through fit_row (gather stages group g's values), then its row sums.
template <typename scalar_t, typename acc_t, typename Gather>
inline void fit_and_store_row(const FwdArgs<scalar_t, acc_t>& A, int64_t r, int64_t n_last, Gather&& gather,
                              double* bx, double* by, RowSums& rs) {
  const FwdRow<acc_t> out{A.slope + r * A.G, A.intercept + r * A.G, A.aux + r * A.G * kAux};
  fit_row(A.G, A.P, n_last, gather, bx, by, A.eps, A.l2, out, rs);
  store_row(A.rows + r * kRowStats, rs);
}

// Staging scratch for fit_row: kWideLanes or kLanes groups when there are that many, or the last group.
inline int64_t stage_size(int64_t G, int64_t P, int64_t n_last) {
  return std::max(G >= kWideLanes ? kWideLanes * P : G >= kLanes ? kLanes * P : P, n_last);
}

// grouping="error": rank the errors with a stable LSD radix sort; its last pass writes each
// element's group id and its x, y at its rank, so every group is contiguous for the fit
// (no index array, and no separate group-id or gather loop).
template <typename Idx, typename scalar_t, typename acc_t>
void fwd_error_rows(const FwdArgs<scalar_t, acc_t>& A, int64_t begin, int64_t end) {
  using U = typename KeyBits<acc_t>::U;
  const int64_t N = A.N, P = A.P, G = A.G, n_last = group_len(G - 1, G, N, P);  // takes N % P extra
  const int max_digit = max_digit_bits(N, int(8 * sizeof(U)));
  auto key = scratch<U>(N), key_tmp = scratch<U>(N);
  auto idx = scratch<Idx>(N), idx_tmp = scratch<Idx>(N);
  auto sx = scratch<acc_t>(N), sy = scratch<acc_t>(N);
  auto hist = scratch<uint32_t>(int64_t(kMaxPasses) << max_digit);
  auto bx = scratch<double>(stage_size(G, P, n_last)), by = scratch<double>(stage_size(G, P, n_last));
  const bool prefetch = N * int64_t(sizeof(int32_t)) > 32768;  // the row's group ids outgrow L1
  constexpr int64_t kAhead = 64;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = A.x + r * N;
    const scalar_t* y = A.y + r * N;
    int32_t* gid_row = A.gid + r * N;
    U* kp = key.get();
    RowSums rs;
    // The key is computed exactly as the twin does: d = y - x in acc_t, e = d * d.
    rs.sqerr = lane_sum(N, [&](int64_t i) {
      const acc_t d = static_cast<acc_t>(y[i]) - static_cast<acc_t>(x[i]);
      const acc_t e = d * d;
      kp[i] = bits_of(error_key(e));
      return static_cast<double>(e);
    });
    U lo = kp[0], hi = kp[0];
    for (int64_t i = 1; i < N; ++i) {
      lo = std::min(lo, kp[i]);
      hi = std::max(hi, kp[i]);
    }
    const bool small = N <= kInsertionSortMax;
    if (small) insertion_sort_by_key(kp, idx.get(), N);
    const DigitPlan plan = small ? DigitPlan{} : plan_digits(bit_width_of(U(hi - lo)), max_digit);
    uint32_t* h[kMaxPasses];
    U mask[kMaxPasses];
    int64_t hist_len = 0;
    for (int p = 0; p < plan.passes; ++p) {
      h[p] = hist.get() + hist_len;
      mask[p] = (U(1) << plan.width[p]) - 1;
      hist_len += int64_t(1) << plan.width[p];
    }
    std::fill(hist.get(), hist.get() + hist_len, 0u);
    // Each pass counts the next one's digit; a pass whose digit is the same for every key is
    // skipped. The top pass never is: the keys 0 and hi - lo differ in its top bit.
    const U* ks = kp;
    const Idx* is = nullptr;   // identity before the first pass
    const Idx* ord = small ? idx.get() : nullptr;  // else identity when every key is equal
    if (plan.passes > 0) {
      rebase_and_count(kp, lo, h[0], mask[0], N);
      for (int p = 0;; ++p) {
        const bool live = offsets(h[p], int64_t(mask[p]) + 1, uint32_t((ks[0] >> plan.shift[p]) & mask[p]), N);
        if (p == plan.passes - 1) {
          Idx* id = is == idx.get() ? idx_tmp.get() : idx.get();
          last_pass(ks, is, id, h[p], plan.shift[p], mask[p], N);
          ord = id;
          break;
        }
        if (!live) {
          count_digit(ks, h[p + 1], plan.shift[p + 1], mask[p + 1], N);
          continue;
        }
        U* kd = ks == kp ? key_tmp.get() : kp;
        Idx* id = is == idx.get() ? idx_tmp.get() : idx.get();
        scatter_pass(ks, is, kd, id, h[p], plan.shift[p], mask[p], h[p + 1], plan.shift[p + 1], mask[p + 1], N);
        ks = kd;
        is = id;
      }
    }
    acc_t* sxp = sx.get();
    acc_t* syp = sy.get();
    // Group ids and the gather of x, y by rank. Short rows: two tight loops (measured faster);
    // long rows: one loop that prefetches the group-id lines for writing, as the ids no
    // longer fit in L1 (scattered stores there otherwise fill the store buffer).
    if (!prefetch || ord == nullptr) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hi = g == G - 1 ? N : (g + 1) * P;
        for (int64_t k = g * P; k < hi; ++k) gid_row[ord ? int64_t(ord[k]) : k] = static_cast<int32_t>(g);
      }
      for (int64_t k = 0; k < N; ++k) {
        const int64_t src = ord ? int64_t(ord[k]) : k;
        sxp[k] = static_cast<acc_t>(x[src]);
        syp[k] = static_cast<acc_t>(y[src]);
      }
    } else {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hi = g == G - 1 ? N : (g + 1) * P;
        for (int64_t k = g * P; k < hi; ++k) {
          const int64_t src = ord[k];
          if (k + kAhead < N) LIFTPLACE_PREFETCH_FOR_WRITE(gid_row + ord[k + kAhead]);
          sxp[k] = static_cast<acc_t>(x[src]);
          syp[k] = static_cast<acc_t>(y[src]);
          gid_row[src] = static_cast<int32_t>(g);
        }
      }
    }
    auto gather = [&](int64_t g, int64_t n, double* dx, double* dy, int64_t stride) {
      const acc_t* gx = sxp + g * P;
      const acc_t* gy = syp + g * P;
      for (int64_t j = 0; j < n; ++j) {
        dx[j * stride] = static_cast<double>(gx[j]);
        dy[j * stride] = static_cast<double>(gy[j]);
      }
    };
    fit_and_store_row(A, r, n_last, gather, bx.get(), by.get(), rs);
  }
}

// grouping="patch": group g is the p x p tile (g / tiles_w, g % tiles_w).
template <typename scalar_t, typename acc_t>
void fwd_patch_rows(const FwdArgs<scalar_t, acc_t>& A, int64_t begin, int64_t end) {
  const int64_t N = A.N, P = A.P, G = A.G, W = A.width;
  const int64_t p = patch_side(P), tiles_w = W / p;
  auto bx = scratch<double>(stage_size(G, P, P)), by = scratch<double>(stage_size(G, P, P));
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = A.x + r * N;
    const scalar_t* y = A.y + r * N;
    RowSums rs;
    rs.sqerr = sum_sq_diff<acc_t>(x, y, N);
    auto gather = [&](int64_t g, int64_t n, double* dx, double* dy, int64_t stride) {
      const int64_t base = (g / tiles_w) * p * W + (g % tiles_w) * p;
      for (int64_t h = 0; h < p; ++h) {
        for (int64_t w = 0; w < p; ++w) {
          const int64_t i = base + h * W + w, j = h * p + w;
          dx[j * stride] = as_double<acc_t>(x[i]);
          dy[j * stride] = as_double<acc_t>(y[i]);
        }
      }
    };
    fit_and_store_row(A, r, P, gather, bx.get(), by.get(), rs);
  }
}

// grouping="global": the row is the group, read in place.
template <typename scalar_t, typename acc_t>
void fwd_global_rows(const FwdArgs<scalar_t, acc_t>& A, int64_t begin, int64_t end) {
  const int64_t N = A.N;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = A.x + r * N;
    const scalar_t* y = A.y + r * N;
    RowSums rs;
    rs.sqerr = sum_sq_diff<acc_t>(x, y, N);
    const FwdRow<acc_t> out{A.slope + r, A.intercept + r, A.aux + r * kAux};
    fit_one<acc_t>(x, y, N, 0, A.eps, A.l2, out, rs);
    store_row(A.rows + r * kRowStats, rs);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: the gradient is affine per group; fold everything per group into a few
// constants, then one streaming pass over the elements.

// GradCoef (the per-group constants) is defined once in lift_place_cpu.cpp, shared by both
// ISA builds: the split backward computes them in one build and uses them in the other.

struct RowGrads {
  double coarse, fine, sqerr, absdev, absb, suma, sumb;
};

// centred form of _reference.lift_place_bwd:
//   grad_x = K (dy - 2a dx) - GB a/n + 2a g_fine r + 2 g_sqerr (x - y)
//   grad_y = K dx + GB/n - 2 g_fine r - 2 g_sqerr (x - y),   r = a dx - dy
template <typename acc_t>
inline GradCoef<acc_t> group_coef(const RowGrads& g, double a, double b, double mx, double my, double d, double n,
                                  bool l2, double extra_a, double extra_b) {
  const double da = l2 ? 2 * (a - 1) : sign(a - 1);
  const double db = l2 ? 2 * b : sign(b);
  const double GA = g.coarse * n * da + g.absdev * sign(a - 1) + g.suma + extra_a;
  const double GB = g.coarse * n * db + g.absb * sign(b) + g.sumb + extra_b;
  const double K = (GA - GB * mx) / (n * d);
  GradCoef<acc_t> c;
  c.mx = static_cast<acc_t>(mx);
  c.my = static_cast<acc_t>(my);
  c.a = static_cast<acc_t>(a);
  c.k = static_cast<acc_t>(K);
  c.two_a = static_cast<acc_t>(2 * a);
  c.fine_a = static_cast<acc_t>(2 * a * g.fine);
  c.cx = static_cast<acc_t>(-GB * a / n);
  c.cy = static_cast<acc_t>(GB / n);
  return c;
}

template <bool kNeedY, typename scalar_t, typename acc_t>
inline void elem_grad(const GradCoef<acc_t>& c, acc_t two_fine, acc_t two_sq, scalar_t xs, scalar_t ys,
                      scalar_t* gx, scalar_t* gy) {
  const acc_t xv = static_cast<acc_t>(xs), yv = static_cast<acc_t>(ys);
  const acc_t dx = xv - c.mx, dy = yv - c.my;
  const acc_t r = c.a * dx - dy;
  const acc_t diff = xv - yv;
  *gx = static_cast<scalar_t>(c.k * (dy - c.two_a * dx) + c.cx + c.fine_a * r + two_sq * diff);
  if constexpr (kNeedY) *gy = static_cast<scalar_t>(c.k * dx + c.cy - two_fine * r - two_sq * diff);
}

// Row r's per-group coefficients into coef[0, G); returns {2 g_fine, 2 g_sqerr}.
template <typename scalar_t, typename acc_t>
inline std::pair<acc_t, acc_t> row_coefs(const BwdArgs<scalar_t, acc_t>& A, int64_t r, GradCoef<acc_t>* coef) {
  const int64_t N = A.N, G = A.G, P = A.P;
  const acc_t* gr = A.grad_rows + r * kRowStats;
  const RowGrads g{gr[kCoarse], gr[kFine], gr[kSqErr], gr[kAbsSlopeDev], gr[kAbsIntercept], gr[kSumSlope],
                   gr[kSumIntercept]};
  for (int64_t k = 0; k < G; ++k) {
    const int64_t j = r * G + k;
    const double n = A.grouping == Grouping::Global ? double(N) : double(group_len(k, G, N, P));
    const acc_t* ax = A.aux + j * kAux;
    coef[k] = group_coef<acc_t>(g, A.slope[j], A.intercept[j], ax[kMeanX], ax[kMeanY], ax[kDenom], n, A.l2,
                                A.grad_slope ? double(A.grad_slope[j]) : 0.0,
                                A.grad_intercept ? double(A.grad_intercept[j]) : 0.0);
  }
  return {static_cast<acc_t>(2 * g.fine), static_cast<acc_t>(2 * g.sqerr)};
}

// The elementwise pass over elements [i0, i1) of row r (for "patch", whole image rows:
// i0 and i1 are multiples of the width). Each element depends only on its own x, y and its
// group's coefficients, so any split of a row gives the same bits.
template <bool kNeedY, typename scalar_t, typename acc_t>
inline void grad_span(const BwdArgs<scalar_t, acc_t>& A, int64_t r, const GradCoef<acc_t>* coef, acc_t two_fine,
                      acc_t two_sq, int64_t i0, int64_t i1, std::atomic<bool>& bad_gid) {
  const int64_t N = A.N, G = A.G, P = A.P;
  const scalar_t* x = A.x + r * N;
  const scalar_t* y = A.y + r * N;
  scalar_t* gx = A.gx + r * N;
  scalar_t* gy = kNeedY ? A.gy + r * N : nullptr;
  if (A.grouping == Grouping::Error) {
    const int32_t* gid = A.gid + r * N;
    bool bad = false;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t k = static_cast<uint32_t>(gid[i]);
      if (k >= static_cast<uint32_t>(G)) {
        bad = true;
        continue;
      }
      elem_grad<kNeedY>(coef[k], two_fine, two_sq, x[i], y[i], gx + i, kNeedY ? gy + i : nullptr);
    }
    if (bad) bad_gid.store(true);
  } else if (A.grouping == Grouping::Patch) {
    const int64_t W = A.width, p = patch_side(P), tiles_w = W / p;
    for (int64_t h = i0 / W; h < i1 / W; ++h) {
      const GradCoef<acc_t>* row_coef = coef + (h / p) * tiles_w;
      for (int64_t tw = 0; tw < tiles_w; ++tw) {
        const GradCoef<acc_t> c = row_coef[tw];
        const int64_t e0 = h * W + tw * p;
        for (int64_t i = e0; i < e0 + p; ++i)
          elem_grad<kNeedY>(c, two_fine, two_sq, x[i], y[i], gx + i, kNeedY ? gy + i : nullptr);
      }
    }
  } else {
    const GradCoef<acc_t> c = coef[0];
    for (int64_t i = i0; i < i1; ++i)
      elem_grad<kNeedY>(c, two_fine, two_sq, x[i], y[i], gx + i, kNeedY ? gy + i : nullptr);
  }
}

template <bool kNeedY, typename scalar_t, typename acc_t>
void bwd_rows(const BwdArgs<scalar_t, acc_t>& A, int64_t begin, int64_t end, std::atomic<bool>& bad_gid) {
  auto coef = scratch<GradCoef<acc_t>>(A.G);
  for (int64_t r = begin; r < end; ++r) {
    const auto [two_fine, two_sq] = row_coefs(A, r, coef.get());
    grad_span<kNeedY>(A, r, coef.get(), two_fine, two_sq, 0, A.N, bad_gid);
  }
}

// Entry points: rows [begin, end) of one parallel_for task.
template <typename scalar_t, typename acc_t>
void fwd_rows(const FwdArgs<scalar_t, acc_t>& A, int64_t begin, int64_t end) {
  if (A.grouping == Grouping::Error) {
    // A uint16 index halves the index traffic of every pass when it fits.
    if (A.N <= 65536)
      fwd_error_rows<uint16_t>(A, begin, end);
    else
      fwd_error_rows<uint32_t>(A, begin, end);
  } else if (A.grouping == Grouping::Patch) {
    fwd_patch_rows(A, begin, end);
  } else {
    fwd_global_rows(A, begin, end);
  }
}

template <typename scalar_t, typename acc_t>
void bwd_rows(const BwdArgs<scalar_t, acc_t>& A, bool need_grad_y, int64_t begin, int64_t end,
              std::atomic<bool>& bad_gid) {
  if (need_grad_y)
    bwd_rows<true>(A, begin, end, bad_gid);
  else
    bwd_rows<false>(A, begin, end, bad_gid);
}

// Few long rows (fewer rows than threads can share): the coefficients of every row first,
// then the elementwise pass split into spans of `span` elements across all rows, so every
// thread works whatever R is. Same bits as bwd_rows (grad_span's comment).
template <typename scalar_t, typename acc_t>
void bwd_rows_coefs(const BwdArgs<scalar_t, acc_t>& A, GradCoef<acc_t>* coefs, acc_t* twos, int64_t begin,
                    int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const auto [two_fine, two_sq] = row_coefs(A, r, coefs + r * A.G);
    twos[2 * r] = two_fine;
    twos[2 * r + 1] = two_sq;
  }
}

template <typename scalar_t, typename acc_t>
void bwd_spans(const BwdArgs<scalar_t, acc_t>& A, bool need_grad_y, const GradCoef<acc_t>* coefs, const acc_t* twos,
               int64_t span, int64_t begin, int64_t end, std::atomic<bool>& bad_gid) {
  const int64_t per_row = (A.N + span - 1) / span;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = t / per_row, i0 = (t % per_row) * span, i1 = std::min(A.N, i0 + span);
    const GradCoef<acc_t>* c = coefs + r * A.G;
    if (need_grad_y)
      grad_span<true>(A, r, c, twos[2 * r], twos[2 * r + 1], i0, i1, bad_gid);
    else
      grad_span<false>(A, r, c, twos[2 * r], twos[2 * r + 1], i0, i1, bad_gid);
  }
}
