/* The fused engine's step on the CPU, written out in C (plumb/fused.py, NativeStep).
 *
 * The same math as plumb.fused.forward_backward and its updates (the formulas are in
 * fused.py's docstring): the forward of plumb's MLP (embedding, then per block
 * z = h W + b, a norm, an activation), the cross-entropy, the hand-written backward, the
 * running statistics, the finite check and plumb's SGD or torch's AdamW, for float32 CPU
 * tensors, in one call. The 18 matmuls of a lecture-deep step go to the BLAS that torch
 * itself calls (its sgemm, handed in by plumb/native.py); everything else is loops here,
 * with no allocation and no dispatch: the compiled graph spends ~190 us of its ~370 us
 * step outside its matmuls, one call of an empty compiled graph alone ~22 us.
 *
 * Rounding: float32 throughout, as the graph; sums in a fixed order (contraction off), so a
 * given machine computes the same bits every run. exp is Cody-Waite reduction and a
 * degree-7 Taylor polynomial (about 2 ulp); tanh a rational approximation fitted for this
 * file (within 7 ulp); torch's own (SLEEF) are within 1 ulp. So a step agrees with the
 * graph and with autograd to float32 rounding, not bit for bit (tests/test_fused).
 *
 * The sgemm's integer arguments point at int64 values below 2^31: an LP64 BLAS reads their
 * low 32 bits (little-endian), an ILP64 one all 64; native.py checks a product on load.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *, const char *, const int64_t *, const int64_t *,
                         const int64_t *, const float *, const float *, const int64_t *,
                         const float *, const int64_t *, const float *, float *,
                         const int64_t *);

enum { NORM_NONE, NORM_BATCH, NORM_LECTURE, NORM_LAYER };
enum { ACT_LINEAR, ACT_TANH, ACT_SIGMOID, ACT_RELU, ACT_LEAKY };

typedef struct { /* one Linear [-> norm] [-> activation] block; NULL where absent */
    int64_t fi, fo, norm, act, correction;
    float eps, momentum, slope, pad;
    float *W, *b, *gamma, *beta, *rm, *rv;  /* the model's tensors; rv: running var or std */
    float *dW, *db, *dgamma, *dbeta;        /* gradients */
    float *h;                               /* input (B, fi) */
    float *z, *y, *xhat, *invstd, *a;       /* (B, fo); y = z without a norm, a = y if linear */
    float *da, *dy, *dz;                    /* their gradients, aliased alike */
    float *dh;                              /* (B, fi): the block before's da, or d(emb) */
    float *scratch;                         /* 2 fo floats */
} Layer;

typedef struct { /* a parameter, its gradient, AdamW's moments, its value before the step */
    float *p, *g, *m, *v, *upd; /* upd: the last measured update */
    int64_t n;
} Param;

typedef struct {
    int64_t B, T, E, V, n_layers, n_params, adamw;
    float *C, *dC, *emb; /* the embedding table, its gradient, emb (B, T E) */
    Layer *layers;
    Param *params;
    float **steps; /* AdamW's step count of each parameter (float32 scalars) */
    int64_t *ids, *targets; /* the batch's ids (B T) and targets (B) as int64 */
    float beta1, beta2, adam_eps, weight_decay;
    sgemm_fn sgemm;
} Net;

/* row-major C (M, N) = A (M, K) B (K, N): column-major C^T = B^T A^T */
static void mm(const Net *net, int64_t M, int64_t N, int64_t K, const float *A, const float *B,
               float *C)
{
    const float one = 1.0f, zero = 0.0f;
    net->sgemm("N", "N", &N, &M, &K, &one, B, &N, A, &K, &zero, C, &N);
}

/* C (M, N) = A (M, K) B^T, B (N, K) */
static void mm_bt(const Net *net, int64_t M, int64_t N, int64_t K, const float *A,
                  const float *B, float *C)
{
    const float one = 1.0f, zero = 0.0f;
    net->sgemm("T", "N", &N, &M, &K, &one, B, &K, A, &K, &zero, C, &N);
}

/* C (M, N) = A^T B, A (K, M), B (K, N) */
static void mm_at(const Net *net, int64_t M, int64_t N, int64_t K, const float *A,
                  const float *B, float *C)
{
    const float one = 1.0f, zero = 0.0f;
    net->sgemm("N", "T", &N, &M, &K, &one, B, &N, A, &M, &zero, C, &N);
}

static inline float bits_to_float(int32_t i)
{
    float f;
    memcpy(&f, &i, 4);
    return f;
}

static inline int32_t float_to_bits(float f)
{
    int32_t i;
    memcpy(&i, &f, 4);
    return i;
}

/* e^x = 2^n e^r, n = round(x / ln 2) (the 1.5 * 2^23 trick), r = x - n ln 2 in two parts,
 * |r| <= ln 2 / 2, e^r by Taylor through r^7 (the rest < 6e-9 relative). Branch-free, so
 * loops of it vectorise; NaN stays NaN, x > 88 is taken as 88, below -87.33 (under the
 * smallest normal) the result is 0. */
static inline float exp_(float x)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    float c = x > 88.0f ? 88.0f : x;
    c = c < -87.33f ? -87.33f : c;
    float t = c * 1.44269504f + magic;
    int32_t n = float_to_bits(t) - float_to_bits(magic);
    float nf = t - magic;
    float r = c - nf * 0.693145752f; /* ln 2, high part (exact products) */
    r = r - nf * 1.42860677e-06f;    /* ln 2, low part */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float e = p * bits_to_float((n + 127) << 23);
    return x < -87.33f ? 0.0f : e;
}

/* tanh(x) = x P(x^2) / Q(x^2) for |x| <= 7.9053 (beyond, +-1 to float32 within 4 ulp):
 * a rational (10, 6) approximation fitted for this file (Loeb's reweighted least squares
 * on the relative error, float64, then rounded to float32): within 7 ulp of tanh on a
 * dense float32 grid (4e-7 absolute near +-1), no exp, no branch; clamped to [-1, 1]. */
static inline float tanh_(float x)
{
    float c = x > 7.9053f ? 7.9053f : x;
    c = c < -7.9053f ? -7.9053f : c;
    float s = c * c;
    float p = 2.853746232e-11f;
    p = p * s - 1.641249803e-08f;
    p = p * s + 1.039062863e-05f;
    p = p * s + 3.038534662e-03f;
    p = p * s + 1.302721649e-01f;
    p = p * s + 1.0f;
    float q = 2.446729341e-04f;
    q = q * s + 2.424041927e-02f;
    q = q * s + 4.636054635e-01f;
    q = q * s + 1.0f;
    float t = c * p / q;
    t = t > 1.0f ? 1.0f : t;
    return t < -1.0f ? -1.0f : t;
}

static void activation_forward(int64_t act, float slope, const float *restrict y,
                               float *restrict a, int64_t n)
{
    int64_t i;
    switch (act) {
    case ACT_TANH:
        for (i = 0; i < n; i++)
            a[i] = tanh_(y[i]);
        break;
    case ACT_SIGMOID:
        for (i = 0; i < n; i++)
            a[i] = 1.0f / (1.0f + exp_(-y[i]));
        break;
    case ACT_RELU: /* clamp_min(0): NaN stays NaN */
        for (i = 0; i < n; i++)
            a[i] = y[i] < 0.0f ? 0.0f : y[i];
        break;
    case ACT_LEAKY:
        for (i = 0; i < n; i++)
            a[i] = y[i] > 0.0f ? y[i] : y[i] * slope;
        break;
    default: /* linear: a is y */
        break;
    }
}

static void activation_backward(int64_t act, float slope, const float *restrict y,
                                const float *restrict a, const float *da, float *dy, int64_t n)
{
    int64_t i;
    switch (act) {
    case ACT_TANH:
        for (i = 0; i < n; i++)
            dy[i] = da[i] * (1.0f - a[i] * a[i]);
        break;
    case ACT_SIGMOID:
        for (i = 0; i < n; i++)
            dy[i] = da[i] * a[i] * (1.0f - a[i]);
        break;
    case ACT_RELU: /* autograd's subgradient: 1 at 0 */
        for (i = 0; i < n; i++)
            dy[i] = da[i] * (y[i] >= 0.0f ? 1.0f : 0.0f);
        break;
    case ACT_LEAKY:
        for (i = 0; i < n; i++)
            dy[i] = y[i] > 0.0f ? da[i] : da[i] * slope;
        break;
    default: /* linear: dy is da */
        break;
    }
}

/* Row helpers: one row of F values at a time, so that the compiler vectorises along it
 * (indexing a (B, F) block as z[i F + j] it did not). */
static void add_row(float *restrict acc, const float *restrict x, int64_t F)
{
    for (int64_t j = 0; j < F; j++)
        acc[j] += x[j];
}

static void add_squared_deviations(float *restrict ss, const float *restrict z,
                                   const float *restrict mean, int64_t F)
{
    for (int64_t j = 0; j < F; j++) {
        float d = z[j] - mean[j];
        ss[j] += d * d;
    }
}

static void add_row_and_product(float *restrict s, float *restrict sp, const float *restrict x,
                                const float *restrict w, int64_t F)
{
    for (int64_t j = 0; j < F; j++) {
        s[j] += x[j];
        sp[j] += x[j] * w[j];
    }
}

static void batch_dz_row(float *restrict dz, const float *restrict dy,
                         const float *restrict xhat, const float *restrict invstd,
                         const float *restrict gamma, const float *restrict k1,
                         const float *restrict k2, int64_t F)
{
    for (int64_t j = 0; j < F; j++)
        dz[j] = invstd[j] * (gamma[j] * dy[j] - k1[j] - xhat[j] * k2[j]);
}

/* xhat = (z - mean) invstd, y = gamma xhat + beta, along one row */
static void normalise_row(const float *restrict z, const float *restrict mean,
                          const float *restrict invstd, const float *restrict gamma,
                          const float *restrict beta, float *restrict xhat, float *restrict y,
                          int64_t F)
{
    for (int64_t j = 0; j < F; j++) {
        float xh = (z[j] - mean[j]) * invstd[j];
        xhat[j] = xh;
        y[j] = gamma[j] * xh + beta[j];
    }
}

/* The activations alone, for tests: a[i] = act(y[i]) (``act``: ACT_*) */
void plumb_activation(int64_t act, float slope, const float *y, float *a, int64_t n)
{
    if (act == ACT_LINEAR)
        memcpy(a, y, n * sizeof(float));
    else
        activation_forward(act, slope, y, a, n);
}

/* Batch norm over the B rows of z (B, F): mean, ss = sum (z - mean)^2, var = ss / (B - c),
 * invstd = 1 / sqrt(var + eps); the running statistics (torch's, or the lecture's std). */
static void batch_forward(const Layer *L, int64_t B)
{
    const int64_t F = L->fo;
    const float m = L->momentum;
    float *restrict mean = L->scratch, *restrict ss = L->scratch + F;
    float *restrict invstd = L->invstd, *restrict xhat = L->xhat, *restrict y = L->y;
    float *restrict rm = L->rm, *restrict rv = L->rv;
    const float *restrict z = L->z, *restrict gamma = L->gamma, *restrict beta = L->beta;
    int64_t i, j;
    for (j = 0; j < F; j++)
        mean[j] = ss[j] = 0.0f;
    for (i = 0; i < B; i++)
        add_row(mean, z + i * F, F);
    for (j = 0; j < F; j++)
        mean[j] /= (float)B;
    for (i = 0; i < B; i++)
        add_squared_deviations(ss, z + i * F, mean, F);
    for (j = 0; j < F; j++) {
        float var = ss[j] / (float)(B - L->correction);
        invstd[j] = 1.0f / sqrtf(L->eps != 0.0f ? var + L->eps : var);
    }
    if (L->norm == NORM_LECTURE)
        for (j = 0; j < F; j++) {
            rm[j] = (1.0f - m) * rm[j] + m * mean[j];
            rv[j] = (1.0f - m) * rv[j] + m * sqrtf(ss[j] / (float)(B - 1));
        }
    else
        for (j = 0; j < F; j++) {
            rm[j] = rm[j] * (1.0f - m) + mean[j] * m;
            rv[j] = rv[j] * (1.0f - m) + ss[j] / (float)(B - 1) * m;
        }
    for (i = 0; i < B; i++)
        normalise_row(z + i * F, mean, invstd, gamma, beta, xhat + i * F, y + i * F, F);
}

/* dz = invstd (gamma dy - gamma sum(dy) / B - xhat gamma sum(dy xhat) / (B - c)) */
static void batch_backward(const Layer *L, int64_t B)
{
    const int64_t F = L->fo;
    float *restrict k1 = L->scratch, *restrict k2 = L->scratch + F;
    float *restrict dgamma = L->dgamma, *restrict dbeta = L->dbeta, *restrict dz = L->dz;
    const float *restrict dy = L->dy, *restrict xhat = L->xhat, *restrict gamma = L->gamma;
    const float *restrict invstd = L->invstd;
    int64_t i, j;
    for (j = 0; j < F; j++)
        dgamma[j] = dbeta[j] = 0.0f;
    for (i = 0; i < B; i++)
        add_row_and_product(dbeta, dgamma, dy + i * F, xhat + i * F, F);
    for (j = 0; j < F; j++) {
        k1[j] = gamma[j] * dbeta[j] / (float)B;
        k2[j] = gamma[j] * dgamma[j] / (float)(B - L->correction);
    }
    for (i = 0; i < B; i++)
        batch_dz_row(dz + i * F, dy + i * F, xhat + i * F, invstd, gamma, k1, k2, F);
}

/* Layer norm over the F features of each row: invstd per row. */
static void layer_forward(const Layer *L, int64_t B)
{
    const int64_t F = L->fo;
    const float *restrict gamma = L->gamma, *restrict beta = L->beta;
    float *restrict invstd = L->invstd;
    int64_t i, j;
    for (i = 0; i < B; i++) {
        const float *restrict z = L->z + i * F;
        float *restrict xhat = L->xhat + i * F, *restrict y = L->y + i * F;
        float mean = 0.0f, ss = 0.0f;
        for (j = 0; j < F; j++)
            mean += z[j];
        mean /= (float)F;
        for (j = 0; j < F; j++)
            ss += (z[j] - mean) * (z[j] - mean);
        float inv = 1.0f / sqrtf(ss / (float)F + L->eps);
        invstd[i] = inv;
        for (j = 0; j < F; j++) {
            float xh = (z[j] - mean) * inv;
            xhat[j] = xh;
            y[j] = gamma[j] * xh + beta[j];
        }
    }
}

/* dz = invstd (dxhat - mean_f dxhat - xhat mean_f (dxhat xhat)), dxhat = gamma dy */
static void layer_backward(const Layer *L, int64_t B)
{
    const int64_t F = L->fo;
    const float *restrict gamma = L->gamma, *restrict invstd = L->invstd;
    float *restrict dgamma = L->dgamma, *restrict dbeta = L->dbeta;
    int64_t i, j;
    for (j = 0; j < F; j++)
        dgamma[j] = dbeta[j] = 0.0f;
    for (i = 0; i < B; i++) {
        const float *restrict dy = L->dy + i * F, *restrict xhat = L->xhat + i * F;
        float *restrict dz = L->dz + i * F;
        float m1 = 0.0f, m2 = 0.0f;
        for (j = 0; j < F; j++) {
            dbeta[j] += dy[j];
            dgamma[j] += dy[j] * xhat[j];
            m1 += gamma[j] * dy[j];
            m2 += gamma[j] * dy[j] * xhat[j];
        }
        m1 /= (float)F;
        m2 /= (float)F;
        for (j = 0; j < F; j++)
            dz[j] = invstd[i] * (gamma[j] * dy[j] - m1 - xhat[j] * m2);
    }
}

/* No inf or NaN: the largest |x| as bits (an integer max, which vectorises) below inf's */
static int all_finite(const float *restrict x, int64_t n)
{
    int32_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t u = float_to_bits(x[i]) & 0x7fffffff;
        top = u > top ? u : top;
    }
    return top < 0x7f800000;
}

static void add_rows(float *z, const float *b, int64_t B, int64_t F)
{
    for (int64_t i = 0; i < B; i++)
        add_row(z + i * F, b, F);
}

static void sum_rows(const float *dz, float *db, int64_t B, int64_t F)
{
    for (int64_t j = 0; j < F; j++)
        db[j] = 0.0f;
    for (int64_t i = 0; i < B; i++)
        add_row(db, dz + i * F, F);
}

/* plumb's SGD: p <- p + (-lr) (g + weight_decay p); with upd, upd <- p_new - p_old (in
 * float32: the update a record step measures) */
static void sgd(float *restrict p, const float *restrict g, float *restrict upd, int64_t n,
                float step, float wd)
{
    int64_t i;
    if (upd)
        for (i = 0; i < n; i++) {
            float old = p[i];
            p[i] = wd != 0.0f ? old + (g[i] + old * wd) * step : old + g[i] * step;
            upd[i] = p[i] - old;
        }
    else if (wd != 0.0f)
        for (i = 0; i < n; i++)
            p[i] = p[i] + (g[i] + p[i] * wd) * step;
    else
        for (i = 0; i < n; i++)
            p[i] = p[i] + g[i] * step;
}

/* torch.optim.AdamW: decoupled weight decay, bias-corrected moments (upd as for sgd) */
static void adamw(float *restrict p, const float *restrict g, float *restrict m,
                  float *restrict v, float *restrict upd, int64_t n, float b1, float b2,
                  float eps, float decay, float step_size, float bc2_sqrt)
{
    for (int64_t i = 0; i < n; i++) {
        float mi = m[i] + (g[i] - m[i]) * (1.0f - b1);
        float vi = v[i] * b2 + g[i] * g[i] * (1.0f - b2);
        float old = p[i];
        m[i] = mi;
        v[i] = vi;
        p[i] = old * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        if (upd)
            upd[i] = p[i] - old;
    }
}

/* The i-th of n ids stored as uint8 (width 1) or int64 (width 8) */
static inline int64_t id_at(const void *ids, int64_t width, int64_t i)
{
    return width == 1 ? (int64_t)((const uint8_t *)ids)[i] : ((const int64_t *)ids)[i];
}

/* One training step. ids (B, T) and targets (B): uint8 or int64 (their byte widths in
 * ``widths``: ids, targets), as plumb's datasets store them. Returns 1 (updated), 0 (a
 * non-finite loss or gradient: nothing updated but the running statistics), -1 (an id
 * outside the embedding), -2 (a target outside the output). *loss_out: the mean
 * cross-entropy. With ``measure``, each parameter's update (p after - p before, in
 * float32) goes to its ``upd``. */
int plumb_mlp_step(Net *net, const void *ids_in, const void *targets_in, int64_t widths,
                   float lr, int64_t measure, float *loss_out)
{
    const int64_t B = net->B, T = net->T, E = net->E, nl = net->n_layers;
    const Layer *out = &net->layers[nl - 1];
    const int64_t V = out->fo;
    const int64_t iw = widths / 16, tw = widths % 16;
    int64_t *ids = net->ids, *targets = net->targets, i, j, k, l;
    for (i = 0; i < B * T; i++) {
        ids[i] = id_at(ids_in, iw, i);
        if (ids[i] < 0 || ids[i] >= net->V)
            return -1;
    }
    for (i = 0; i < B; i++) {
        targets[i] = id_at(targets_in, tw, i);
        if (targets[i] < 0 || targets[i] >= V)
            return -2;
    }

    for (i = 0; i < B * T; i++)
        memcpy(net->emb + i * E, net->C + ids[i] * E, E * sizeof(float));
    for (l = 0; l < nl; l++) {
        Layer *L = &net->layers[l];
        const int64_t n = B * L->fo;
        mm(net, B, L->fo, L->fi, L->h, L->W, L->z);
        if (L->b)
            add_rows(L->z, L->b, B, L->fo);
        if (L->norm == NORM_BATCH || L->norm == NORM_LECTURE)
            batch_forward(L, B);
        else if (L->norm == NORM_LAYER)
            layer_forward(L, B);
        activation_forward(L->act, L->slope, L->y, L->a, n);
    }

    /* loss = mean(logsumexp(logits) - logits[target]), dlogits = (softmax - onehot) / B */
    double total = 0.0;
    for (i = 0; i < B; i++) {
        const float *x = out->a + i * V;
        float *dx = out->da + i * V, mx = -INFINITY, s = 0.0f;
        for (j = 0; j < V; j++)
            mx = x[j] > mx ? x[j] : mx;
        for (j = 0; j < V; j++)
            s += exp_(x[j] - mx);
        float lse = mx + logf(s);
        total += (double)(lse - x[targets[i]]);
        for (j = 0; j < V; j++)
            dx[j] = (exp_(x[j] - lse) - (j == targets[i] ? 1.0f : 0.0f)) / (float)B;
    }
    float loss = (float)(total / (double)B);
    *loss_out = loss;

    for (l = nl - 1; l >= 0; l--) {
        Layer *L = &net->layers[l];
        const int64_t n = B * L->fo;
        activation_backward(L->act, L->slope, L->y, L->a, L->da, L->dy, n);
        if (L->norm == NORM_BATCH || L->norm == NORM_LECTURE)
            batch_backward(L, B);
        else if (L->norm == NORM_LAYER)
            layer_backward(L, B);
        mm_at(net, L->fi, L->fo, B, L->h, L->dz, L->dW);
        if (L->b)
            sum_rows(L->dz, L->db, B, L->fo);
        mm_bt(net, B, L->fi, L->fo, L->dz, L->W, L->dh);
    }
    const float *demb = net->layers[0].dh; /* (B, T E) */
    memset(net->dC, 0, net->V * E * sizeof(float));
    for (i = 0; i < B * T; i++)
        for (k = 0; k < E; k++)
            net->dC[ids[i] * E + k] += demb[i * E + k];

    int ok = isfinite(loss);
    for (k = 0; k < net->n_params && ok; k++)
        ok = all_finite(net->params[k].g, net->params[k].n);
    if (!ok) {
        if (measure) /* nothing updated: each update is p - p (0, NaN where p is not finite) */
            for (k = 0; k < net->n_params; k++)
                for (i = 0; i < net->params[k].n; i++)
                    net->params[k].upd[i] = net->params[k].p[i] - net->params[k].p[i];
        return 0;
    }

    if (!net->adamw) {
        const float wd = net->weight_decay, step = -lr;
        for (k = 0; k < net->n_params; k++) {
            const Param *P = &net->params[k];
            sgd(P->p, P->g, measure ? P->upd : NULL, P->n, step, wd);
        }
        return 1;
    }
    const float b1 = net->beta1, b2 = net->beta2, eps = net->adam_eps;
    const double t = (double)*net->steps[0] + 1.0;
    const float decay = 1.0f - lr * net->weight_decay;
    const float step_size = (float)(lr / (1.0 - pow(b1, t)));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(b2, t));
    for (k = 0; k < net->n_params; k++) {
        const Param *P = &net->params[k];
        *net->steps[k] = (float)t;
        adamw(P->p, P->g, P->m, P->v, measure ? P->upd : NULL, P->n, b1, b2, eps, decay,
              step_size, bc2_sqrt);
    }
    return 1;
}
