/* plumb's record-step statistics of many float32 tensors in one call (plumb/native.py).
 *
 * For each tensor x (or, for a parameter's update, x - b elementwise in float32, as torch
 * computes it) of n values:
 *
 *     mean = sum x / n,  M2 = sum (x - mean)^2,  min, max  (NaN if any value is NaN)
 *
 * Two passes, the second mostly from cache:
 *
 *   1. s = sum (x - x0), with x0 the first value (0 if it is not finite), and min, max;
 *      mean = x0 + s / n. Shifting by a value of the tensor keeps the terms of the order
 *      of its spread, not of |mean|.
 *   2. M2 = sum (x - m)^2 - n (m - mean)^2, with m = mean rounded to float32 (exact:
 *      sum (x - m)^2 = M2 + n (mean - m)^2); the terms are >= 0, so nothing cancels.
 *
 * The differences and squares are float32, as the values are; each sum runs in LANES
 * lanes (element j to lane j % LANES) that add K terms in float32 before passing their
 * sum to a double lane (the last n % (LANES K) values: as many runs of LANES as there
 * are, fewer than K, then the last n % LANES values one by one in double, in lane 0).
 * So each float32 partial sum holds at most K rounded terms, and
 * with u = 2^-24: the mean is within K u (max - min) of the exact one (each term
 * |x - x0| <= max - min), and M2 within (K + 2) u = 6e-7 of sum (x - m)^2 (terms >= 0),
 * which exceeds M2 by n (m - mean)^2 <= n u^2 mean^2; the double sums add ~1e-16. So the
 * record's figures keep float32's precision, whatever the length (the error of torch's
 * float32 reductions grows with it). Doing the inner
 * work on float32 vectors (16 values per AVX-512 register instead of 8 doubles) halves
 * the time of a pass on this CPU against double throughout.
 *
 * The order of every addition is fixed by this source, lanes added in lane order at the
 * end: the compiler vectorises the lanes whatever the CPU's vector width, and with
 * contraction off (-ffp-contract=off) every machine computes the same bits.
 */
#include <math.h>
#include <stdint.h>

#define LANES 32
#define K 8

#define STATS(NAME, VALUE)                                                          \
    static void NAME(const float *x, const float *b, int64_t n, double *out)        \
    {                                                                                \
        double s[LANES] = {0}, q[LANES] = {0}, sum = 0.0, m2 = 0.0, mean, dm;        \
        float f[LANES], lo[LANES], hi[LANES], mn = INFINITY, mx = -INFINITY, x0, m;  \
        int nan[LANES] = {0}, anynan = 0, l;                                         \
        int64_t tail = n - n % LANES, stop, j, k;                                    \
        (void)b;                                                                     \
        if (n == 0) { /* as the sums would say: no values */                         \
            out[0] = NAN;                                                            \
            out[1] = 0.0;                                                            \
            out[2] = INFINITY;                                                       \
            out[3] = -INFINITY;                                                      \
            return;                                                                  \
        }                                                                            \
        x0 = VALUE(0);                                                               \
        x0 = x0 - x0 == 0.0f ? x0 : 0.0f; /* inf or NaN: no shift */                 \
        for (l = 0; l < LANES; l++) {                                                \
            lo[l] = INFINITY;                                                        \
            hi[l] = -INFINITY;                                                       \
        }                                                                            \
        for (j = 0; j < tail; j += LANES * K) { /* K runs, fewer at the end */      \
            stop = j + LANES * K < tail ? j + LANES * K : tail;                      \
            for (l = 0; l < LANES; l++)                                              \
                f[l] = 0.0f;                                                         \
            for (k = j; k < stop; k += LANES)                                        \
                for (l = 0; l < LANES; l++) {                                        \
                    float v = VALUE(k + l);                                          \
                    f[l] += v - x0;                                                  \
                    lo[l] = v < lo[l] ? v : lo[l];                                   \
                    hi[l] = v > hi[l] ? v : hi[l];                                   \
                    nan[l] |= v != v;                                                \
                }                                                                    \
            for (l = 0; l < LANES; l++)                                              \
                s[l] += (double)f[l];                                                \
        }                                                                            \
        for (j = tail; j < n; j++) {                                                 \
            float v = VALUE(j);                                                      \
            s[0] += (double)(v - x0);                                                \
            lo[0] = v < lo[0] ? v : lo[0];                                           \
            hi[0] = v > hi[0] ? v : hi[0];                                           \
            nan[0] |= v != v;                                                        \
        }                                                                            \
        for (l = 0; l < LANES; l++) {                                                \
            sum += s[l];                                                             \
            mn = lo[l] < mn ? lo[l] : mn;                                            \
            mx = hi[l] > mx ? hi[l] : mx;                                            \
            anynan |= nan[l];                                                        \
        }                                                                            \
        mean = (double)x0 + sum / (double)n;                                         \
        m = (float)mean;                                                             \
        for (j = 0; j < tail; j += LANES * K) {                                      \
            stop = j + LANES * K < tail ? j + LANES * K : tail;                      \
            for (l = 0; l < LANES; l++)                                              \
                f[l] = 0.0f;                                                         \
            for (k = j; k < stop; k += LANES)                                        \
                for (l = 0; l < LANES; l++) {                                        \
                    float d = VALUE(k + l) - m;                                      \
                    f[l] += d * d;                                                   \
                }                                                                    \
            for (l = 0; l < LANES; l++)                                              \
                q[l] += (double)f[l];                                                \
        }                                                                            \
        for (j = tail; j < n; j++) {                                                 \
            float d = VALUE(j) - m;                                                  \
            q[0] += (double)(d * d);                                                 \
        }                                                                            \
        for (l = 0; l < LANES; l++)                                                  \
            m2 += q[l];                                                              \
        dm = (double)m - mean;                                                       \
        m2 -= (double)n * dm * dm;                                                   \
        out[0] = mean;                                                               \
        out[1] = m2 < 0.0 ? 0.0 : m2; /* NaN stays NaN */                            \
        out[2] = anynan ? NAN : (double)mn;                                          \
        out[3] = anynan ? NAN : (double)mx;                                          \
    }

#define PLAIN(i) x[i]
#define UPDATE(i) (x[i] - b[i])
STATS(stats_of_values, PLAIN)
STATS(stats_of_updates, UPDATE)

/* count rows: xs[i] (and bs[i], or NULL) of ns[i] values; row i's mean, M2, min, max at
 * out + stride * i (stride >= 4 doubles). same[i] >= 0 (< i): the row is row same[i]'s
 * (the same tensor given twice), copied; -2: NaN (no values to measure); -1: computed. */
void plumb_row_stats(int64_t count, const float *const *xs, const float *const *bs,
                     const int64_t *ns, const int64_t *same, int64_t stride, double *out)
{
    for (int64_t i = 0; i < count; i++) {
        double *o = out + stride * i;
        if (same[i] >= 0)
            for (int k = 0; k < 4; k++)
                o[k] = out[stride * same[i] + k];
        else if (same[i] == -2)
            o[0] = o[1] = o[2] = o[3] = NAN;
        else if (bs[i])
            stats_of_updates(xs[i], bs[i], ns[i], o);
        else
            stats_of_values(xs[i], 0, ns[i], o);
    }
}

/* Histogram counts: value v of tensor i goes to bin floor(y), y = (v - lo[i]) * scale[i]
 * in float32 (NaN -> bin 0, y clamped to [0, bins - 1]: the arithmetic of
 * plumb.stats.Plan.bin_indices, so the counts are the same), added into row slot[i] of
 * counts (n_slots, bins). The bins of a block of values are computed first (vectorised),
 * then counted into eight interleaved 32-bit tables (value j into table j % 8, summed at
 * the end, at least every 2^30 values so that none overflows), so that runs of one bin
 * do not wait on the previous increment. scratch: 4 * bins int64s (8 * bins uint32s). */
#define BLOCK 512
#define TABLES 8
#define CHUNK (1 << 30)

void plumb_histograms(int64_t count, const float *const *xs, const int64_t *ns,
                      const float *lo, const float *scale, const int64_t *slot,
                      int64_t bins, int64_t *scratch, int64_t *counts)
{
    const float top = (float)(bins - 1);
    uint32_t *tab = (uint32_t *)scratch;
    int32_t at[BLOCK];
    for (int64_t i = 0; i < count; i++) {
        const float *x = xs[i], a = lo[i], s = scale[i];
        int64_t n = ns[i], j, t, k, c;
        for (c = 0; c < n; c += CHUNK) {
            int64_t end = n - c < CHUNK ? n : c + CHUNK;
            for (j = 0; j < TABLES * bins; j++)
                tab[j] = 0;
            for (j = c; j < end; j += BLOCK) {
                int64_t m = end - j < BLOCK ? end - j : BLOCK;
                for (k = 0; k < m; k++) { /* NaN and y < 0: 0; y > top: top */
                    float y = (x[j + k] - a) * s;
                    y = y > 0.0f ? y : 0.0f;
                    y = y < top ? y : top;
                    at[k] = (int32_t)y;
                }
                for (k = 0; k + TABLES <= m; k += TABLES)
                    for (t = 0; t < TABLES; t++)
                        tab[t * bins + at[k + t]]++;
                for (; k < m; k++)
                    tab[at[k]]++;
            }
            for (t = 0; t < TABLES; t++)
                for (j = 0; j < bins; j++)
                    counts[slot[i] * bins + j] += tab[t * bins + j];
        }
    }
}

/* Off counts of saturating and rectifying outputs (plumb.stats.off_mask): tensor i holds
 * ns[i] values laid out (outer, units[i], inner[i]); a value v is off when
 *
 *     kind 1 (tanh):     |v| > thr[i]          kind 2 (sigmoid): |v - 0.5f| > thr[i]
 *     kind 0 (rectifier): v <= 0
 *
 * in float32 (NaN is never off, as torch's comparisons say). counts[at[i]]: the values
 * off; with units[i] > 0, all_off[u] (the next units[i] entries per tensor, in order):
 * 1.0 where unit u is off for every outer and inner index, else 0.0, and where
 * frac_at[i] >= 0, counts[frac_at[i]] = (units all off) / units[i] (the fraction of
 * dead units: an integer over an integer, as torch's mean of the flags divides their
 * exact sum). scratch: max units + max units * inner bytes. */
static int64_t count_off(const float *s, int64_t m, int64_t kind, float t)
{
    int64_t c = 0, k;
    if (kind == 1)
        for (k = 0; k < m; k++)
            c += fabsf(s[k]) > t;
    else if (kind == 2)
        for (k = 0; k < m; k++)
            c += fabsf(s[k] - 0.5f) > t;
    else
        for (k = 0; k < m; k++)
            c += s[k] <= 0.0f;
    return c;
}

/* f[k] = 1 where s[k] is off, for m values; returns how many are */
static int64_t flag_off(const float *s, int64_t m, int64_t kind, float t, unsigned char *f)
{
    int64_t c = 0, k;
    if (kind == 1)
        for (k = 0; k < m; k++)
            f[k] = fabsf(s[k]) > t;
    else if (kind == 2)
        for (k = 0; k < m; k++)
            f[k] = fabsf(s[k] - 0.5f) > t;
    else
        for (k = 0; k < m; k++)
            f[k] = s[k] <= 0.0f;
    for (k = 0; k < m; k++)
        c += f[k];
    return c;
}

void plumb_off_counts(int64_t count, const float *const *xs, const int64_t *ns,
                      const int64_t *kinds, const float *thr, const int64_t *units,
                      const int64_t *inner, unsigned char *scratch, const int64_t *at,
                      const int64_t *frac_at, double *counts, double *all_off)
{
    int64_t most = 0; /* the largest units: scratch holds acc (most), then a slab's flags */
    for (int64_t i = 0; i < count; i++)
        most = units[i] > most ? units[i] : most;
    for (int64_t i = 0; i < count; i++) {
        const float *x = xs[i], t = thr[i];
        const int64_t n = ns[i], kind = kinds[i], U = units[i], in = inner[i];
        int64_t off = 0, j, u, k;
        unsigned char *acc = scratch, *f = scratch + most;
        if (U == 0) {
            counts[at[i]] = (double)count_off(x, n, kind, t);
            continue;
        }
        for (u = 0; u < U; u++)
            acc[u] = 1;
        for (j = 0; j < n; j += U * in) { /* one (units, inner) slab at a time */
            off += flag_off(x + j, U * in, kind, t, f);
            if (in == 1)
                for (u = 0; u < U; u++)
                    acc[u] &= f[u];
            else
                for (u = 0; u < U; u++) {
                    unsigned char all = acc[u];
                    for (k = 0; k < in; k++)
                        all &= f[u * in + k];
                    acc[u] = all;
                }
        }
        counts[at[i]] = (double)off;
        off = 0;
        for (u = 0; u < U; u++) {
            all_off[u] = acc[u];
            off += acc[u];
        }
        if (frac_at[i] >= 0)
            counts[frac_at[i]] = (double)off / (double)U;
        all_off += U;
    }
}
