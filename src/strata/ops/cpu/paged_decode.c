/* Paged decode attention on the CPU, float32: one query token per sequence, reading K and V straight from the
 * paged cache (no gather copy). The twin is strata.ops.ref.paged_decode_attention.
 *
 * Layout (as everywhere in strata): k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim];
 * block_tables [B, stride] int32; seq_lens [B] int32 (context incl. the new token); q and out [B, heads, head_dim].
 * A query head h reads kv head h / (heads / kv_heads). Sliding window W > 0: only the last W keys.
 *
 * Two passes per sequence, each walking its blocks in order: the scores of every query head against each key
 * (one token's row of all kv heads at a time, kept in a scratch [token][head] array), then softmax and the
 * weighted sum of the V rows. Every K and V row is read once. Sequences are split across `nthreads` threads by amount of work (sum of attended lengths). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q, *kc, *vc;
    const int32_t *bt, *lens;
    float *out;
    int64_t bt_stride;
    int heads, kv_heads, dim, bs, window, start, end, status;
    float scale;
} job_t;

static int first_key(int L, int window) { return (window > 0 && L > window) ? L - window : 0; }

/* `d` is a compile-time constant in the specialised copies below (64, 128): the dot products and updates then
 * unroll into whole vector instructions with no remainder loops. */
static inline __attribute__((always_inline)) void attend(job_t *j, const int d) {
    const int H = j->heads, g = H / j->kv_heads, bs = j->bs, row = j->kv_heads * d;
    int max_n = 1;
    for (int b = j->start; b < j->end; b++) {
        int n = j->lens[b] - first_key(j->lens[b], j->window);
        if (n > max_n) max_n = n;
    }
    float *s = (float *)malloc(sizeof(float) * (size_t)max_n * H);  /* scores, [token][head] */
    float *acc = (float *)malloc(sizeof(float) * (size_t)H * d);
    float *mx = (float *)malloc(sizeof(float) * H), *sum = (float *)malloc(sizeof(float) * H);
    if (!s || !acc || !mx || !sum) {
        j->status = 1;
        free(s); free(acc); free(mx); free(sum);
        return;
    }
    for (int b = j->start; b < j->end; b++) {
        const int L = j->lens[b], lo = first_key(L, j->window), n = L - lo;
        const int32_t *tab = j->bt + (int64_t)b * j->bt_stride;
        const float *qb = j->q + (int64_t)b * H * d;
        /* pass 1: every head's score against every key, one token's row (all kv heads) at a time */
        for (int t = lo; t < L;) {
            const int blk = t / bs, o0 = t % bs, o1 = (L - blk * bs) < bs ? L - blk * bs : bs;
            const float *kb = j->kc + (int64_t)tab[blk] * bs * row;
            for (int o = o0; o < o1; o++, t++) {
                const float *kr = kb + (int64_t)o * row;
                float *st = s + (int64_t)(t - lo) * H;
                for (int h = 0; h < H; h++) {
                    const float *qh = qb + (int64_t)h * d, *kh = kr + (int64_t)(h / g) * d;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int x = 0; x < d; x++) dot += qh[x] * kh[x];
                    st[h] = dot * j->scale;
                }
            }
        }
        for (int h = 0; h < H; h++) { mx[h] = -INFINITY; sum[h] = 0.0f; }
        for (int t = 0; t < n; t++)
            for (int h = 0; h < H; h++)
                if (s[(int64_t)t * H + h] > mx[h]) mx[h] = s[(int64_t)t * H + h];
        for (int t = 0; t < n; t++)
            for (int h = 0; h < H; h++) {
                float p = expf(s[(int64_t)t * H + h] - mx[h]);
                s[(int64_t)t * H + h] = p;
                sum[h] += p;
            }
        /* pass 2: the weighted sum of V rows */
        for (int e = 0; e < H * d; e++) acc[e] = 0.0f;
        for (int t = lo; t < L;) {
            const int blk = t / bs, o0 = t % bs, o1 = (L - blk * bs) < bs ? L - blk * bs : bs;
            const float *vb = j->vc + (int64_t)tab[blk] * bs * row;
            for (int o = o0; o < o1; o++, t++) {
                const float *vr = vb + (int64_t)o * row;
                const float *pt = s + (int64_t)(t - lo) * H;
                for (int h = 0; h < H; h++) {
                    const float p = pt[h], *vh = vr + (int64_t)(h / g) * d;
                    float *ah = acc + (int64_t)h * d;
#pragma omp simd
                    for (int x = 0; x < d; x++) ah[x] += p * vh[x];
                }
            }
        }
        float *ob = j->out + (int64_t)b * H * d;
        for (int h = 0; h < H; h++) {
            const float inv = n > 0 ? 1.0f / sum[h] : 0.0f;
            for (int x = 0; x < d; x++) ob[(int64_t)h * d + x] = acc[(int64_t)h * d + x] * inv;
        }
    }
    free(s); free(acc); free(mx); free(sum);
}

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    switch (j->dim) {
        case 64: attend(j, 64); break;
        case 128: attend(j, 128); break;
        default: attend(j, j->dim);
    }
    return NULL;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 on a bad shape. */
int strata_paged_decode_f32(const float *q, const float *kc, const float *vc, const int32_t *bt, int64_t bt_stride,
                            const int32_t *lens, float *out, int B, int heads, int kv_heads, int dim, int bs,
                            float scale, int window, int nthreads) {
    if (B <= 0) return 0;
    if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || bs <= 0) return 2;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (nthreads > B) nthreads = B;
    int64_t total = 0;
    for (int b = 0; b < B; b++) total += lens[b] - first_key(lens[b], window);
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    int64_t done = 0;
    int b = 0;
    for (int w = 0; w < nthreads; w++) {  /* contiguous ranges of about equal work */
        job_t jb = {q, kc, vc, bt, lens, out, bt_stride, heads, kv_heads, dim, bs, window, b, b, 0, scale};
        int64_t target = total * (w + 1) / nthreads;
        while (b < B && (done < target || w == nthreads - 1)) {
            done += lens[b] - first_key(lens[b], window);
            b++;
        }
        jb.end = b;
        jobs[w] = jb;
    }
    for (int w = 1; w < nthreads; w++)
        started[w] = pthread_create(&tids[w], NULL, run, &jobs[w]) == 0;
    run(&jobs[0]);
    for (int w = 1; w < nthreads; w++) {
        if (started[w]) pthread_join(tids[w], NULL);
        else run(&jobs[w]);
    }
    int status = 0;
    for (int w = 0; w < nthreads; w++) status |= jobs[w].status;
    return status;
}
