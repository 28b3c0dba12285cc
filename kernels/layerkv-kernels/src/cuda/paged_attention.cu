// layerkv CUDA kernels: split-K paged attention over block tables, the attention-mass pass for
// score-based retention, and the KvStore scatter. Compiled at run time with NVRTC (no headers:
// f16/bf16 are widened with PTX `cvt` and bit shifts), so the crate builds without a toolkit.
//
// Pages hold f32, f16, bf16, llama.cpp's Q8_0 / Q4_0 blocks (32 values per block: an f16
// scale, then 32 int8 values or 16 bytes of 4-bit values offset by 8), or MXFP8 e4m3 blocks (an
// E8M0 scale byte, then 32 e4m3 codes). A page row is whole
// blocks, so value i of a row is value i % 32 of its block i / 32 and every loader takes a value
// index: block pages are dequantized where they are read, as the float pages are widened. K and
// V have their own types (llama.cpp's -ctk / -ctv); the host rotates queries and outputs when
// the store keeps Q8_0 / Q4_0 rows rotated (`KvTypes::rotates_k` / `rotates_v`), so the kernels
// never see the rotation.
//
// Semantics match the CPU kernel (`cpu.rs`): a query row at logical slot p sees slots s in
// [lo, hi) with hi = p + 1 (p when the diagonal is masked for upward sharing), clipped to the
// filled slots, lo = p + 1 - window under a sliding window; a slot counts only if its validity
// bit is set (the host checks that every page is in the store). Scores, softmax and
// accumulation are f32.
//
// Work split (flash-decoding): grid (query row, kv head, split); a split covers `chunks` chunks
// of `part` logical slots. For each chunk a block computes the scores of every query head of
// the GQA group into shared memory, then folds the chunk into its running max, exp-sum and
// unnormalised weighted V (online softmax); `layerkv_attn_reduce` merges the splits per
// (row, head) with the usual log-sum-exp rescaling. The host caps the splits at about 2048
// blocks a call, so the partials stay within 2048 x group x head_dim floats or the output's
// size, whichever is larger (long prefill gets one split of many chunks per row; short batches
// get many one-chunk splits to fill the GPU).

#define NEG_INF __int_as_float(0xff800000)
#define WARPS 4
#define THREADS (WARPS * 32)
#define MAX_DIM_PER_LANE 8  // head_dim <= 256

// Per sequence metadata, SEQ_INFO ints each.
#define SEQ_INFO 8
#define SI_Q_START 0
#define SI_NUM_Q 1
#define SI_Q_POS 2
#define SI_NUM_SLOTS 3
#define SI_PAGE_OFF 4
#define SI_VALID_OFF 5  // -1: every filled slot is valid
#define SI_MASS_OFF 6

__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float load_f16(const unsigned short* p, size_t i) {
    return half_to_float(p[i]);
}

__device__ __forceinline__ float load_bf16(const unsigned short* p, size_t i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}

// The f16 scale at the start of a block (little-endian; blocks are byte-aligned only).
__device__ __forceinline__ float block_scale(const unsigned char* b) {
    return half_to_float((unsigned short)(b[0] | (b[1] << 8)));
}

// Value i of Q8_0 rows: 34-byte blocks (scale, 32 x int8).
__device__ __forceinline__ float load_q8_0(const unsigned char* p, size_t i) {
    const unsigned char* b = p + (i >> 5) * 34;
    return block_scale(b) * (float)(signed char)b[2 + (i & 31)];
}

// Value i of Q4_0 rows: 18-byte blocks (scale, 16 bytes); values 0..16 of a block are the low
// nibbles of its bytes, 16..32 the high nibbles, each offset by 8.
__device__ __forceinline__ float load_q4_0(const unsigned char* p, size_t i) {
    const unsigned char* b = p + (i >> 5) * 18;
    const int j = (int)(i & 31);
    const int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
    return block_scale(b) * (float)(q - 8);
}

// Value i of MXFP8 rows: 33-byte blocks (an E8M0 scale byte, 32 e4m3 codes). The code moved
// into an f16's bits (S 0EEEE MMM0000000) is its value times 2^-8, subnormals included, so the
// scale 2^(e - 127) is applied as 2^(e - 119).
__device__ __forceinline__ float load_e4m3(const unsigned char* p, size_t i) {
    const unsigned char* b = p + (i >> 5) * 33;
    const unsigned int c = b[1 + (i & 31)];
    const unsigned short h = (unsigned short)(((c & 0x80u) << 8) | ((c & 0x7fu) << 7));
    // The quantizer writes scale bytes 1..246, so b[0] + 8 is a finite f32 exponent.
    return half_to_float(h) * __int_as_float(((int)b[0] + 8) << 23);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// The shape and rule of one call.
struct Params {
    int total_q;
    int heads;
    int kv_heads;
    int head_dim;
    int block_size;
    int part;        // logical slots per chunk (the shared-memory score buffer)
    int num_splits;
    int chunks;      // chunks per split
    int window;      // -1: no sliding window
    int include_diag;
    float scale;
};

// The visible slot range of this block's (row, split): up to `chunks x part` slots; false if the
// block has nothing to do.
__device__ __forceinline__ bool block_range(const Params& P, const int* row_seq,
                                            const int* seq_info, int row, int split, int* seq_out,
                                            int* lo_out, int* hi_out) {
    int seq = row_seq[row];
    if (seq < 0) return false;
    const int* si = seq_info + seq * SEQ_INFO;
    int n = si[SI_NUM_SLOTS];
    int p = si[SI_Q_POS] + (row - si[SI_Q_START]);
    int hi = P.include_diag ? p + 1 : p;
    if (hi > n) hi = n;
    int lo = P.window >= 0 ? p + 1 - P.window : 0;
    if (lo < 0) lo = 0;
    int s0 = split * P.part * P.chunks, s1 = s0 + P.part * P.chunks;
    if (lo < s0) lo = s0;
    if (hi > s1) hi = s1;
    *seq_out = seq;
    *lo_out = lo;
    *hi_out = hi;
    return lo < hi;
}

// Scores of slots [lo, hi) for the `group` query heads of kv head `kvh` into
// scores[g * part + (s - lo)] (-inf for dropped slots) and the physical row of each slot into
// phys[s - lo] (-1 for dropped slots). `sq` holds the group's scaled query rows.
template <typename T, float (*LOAD)(const T*, size_t)>
__device__ void block_scores(const Params& P, const T* k, const unsigned int* pages,
                             const unsigned long long* valid, const int* si, int kvh, int group,
                             int lo, int hi, const float* sq, float* scores, int* phys) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int d = P.head_dim;
    const unsigned int* seq_pages = pages + si[SI_PAGE_OFF];
    const int valid_off = si[SI_VALID_OFF];
    for (int s = lo + warp; s < hi; s += WARPS) {
        unsigned int page = seq_pages[s / P.block_size];
        bool ok = valid_off < 0 || ((valid[valid_off + (s >> 6)] >> (s & 63)) & 1ull);
        if (!ok) {
            if (lane == 0) {
                phys[s - lo] = -1;
                for (int g = 0; g < group; ++g) scores[g * P.part + (s - lo)] = NEG_INF;
            }
            continue;
        }
        long long row = (long long)page * P.block_size + (s % P.block_size);
        const size_t base = ((size_t)row * P.kv_heads + kvh) * d;
        float kr[MAX_DIM_PER_LANE];
#pragma unroll
        for (int j = 0; j < MAX_DIM_PER_LANE; ++j) {
            int i = lane + 32 * j;
            kr[j] = i < d ? LOAD(k, base + i) : 0.f;
        }
        for (int g = 0; g < group; ++g) {
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < MAX_DIM_PER_LANE; ++j) {
                int i = lane + 32 * j;
                if (i < d) acc += sq[g * d + i] * kr[j];
            }
            acc = warp_sum(acc);
            if (lane == 0) scores[g * P.part + (s - lo)] = acc;
        }
        if (lane == 0) phys[s - lo] = (int)row;
    }
}

// Loads the group's query rows (scaled) into shared memory.
__device__ void load_queries(const Params& P, const float* q, int row, int kvh, int group,
                             float* sq) {
    const int d = P.head_dim;
    const size_t base = ((size_t)row * P.heads + (size_t)kvh * group) * d;
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) sq[i] = q[base + i] * P.scale;
}

// Shared memory: scores [group * part] | queries [group * d] | phys [part] |
// max, sum, rescale factor [group].
template <typename TK, float (*LOADK)(const TK*, size_t), typename TV,
          float (*LOADV)(const TV*, size_t)>
__device__ void attn_partial(Params P, const float* q, const TK* k, const TV* v,
                             const int* row_seq, const int* seq_info, const unsigned int* pages,
                             const unsigned long long* valid, float* part_out, float* part_m,
                             float* part_l) {
    extern __shared__ float smem[];
    const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int group = P.heads / P.kv_heads, d = P.head_dim;
    float* scores = smem;
    float* sq = scores + group * P.part;
    int* phys = (int*)(sq + group * d);
    float* smax = (float*)(phys + P.part);
    float* ssum = smax + group;
    float* sfac = ssum + group;
    const size_t ml = ((size_t)split * P.total_q + row) * P.heads + (size_t)kvh * group;
    float* out = part_out + ml * d;

    // Every path starts from an empty partial: zero output, -inf max, zero sum.
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) out[i] = 0.f;
    int seq, lo, hi;
    if (!block_range(P, row_seq, seq_info, row, split, &seq, &lo, &hi)) {
        for (int g = threadIdx.x; g < group; g += blockDim.x) {
            part_m[ml + g] = NEG_INF;
            part_l[ml + g] = 0.f;
        }
        return;
    }
    const int* si = seq_info + seq * SEQ_INFO;
    load_queries(P, q, row, kvh, group, sq);
    for (int g = threadIdx.x; g < group; g += blockDim.x) {
        smax[g] = NEG_INF;
        ssum[g] = 0.f;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c0 = lo; c0 < hi; c0 += P.part) {
        const int c1 = min(c0 + P.part, hi), n = c1 - c0;
        block_scores<TK, LOADK>(P, k, pages, valid, si, kvh, group, c0, c1, sq, scores, phys);
        __syncthreads();

        // Per head, one warp each: the chunk's max joins the running max; weights
        // exp(s - max) in place; what was summed under the old max is rescaled by
        // e^(old - new) (0 while nothing has been seen).
        for (int g = warp; g < group; g += WARPS) {
            float* sc = scores + g * P.part;
            float m = NEG_INF;
            for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[j]);
            m = fmaxf(warp_max(m), smax[g]);
            float l = 0.f;
            for (int j = lane; j < n; j += 32) {
                float e = m == NEG_INF ? 0.f : expf(sc[j] - m);
                sc[j] = e;
                l += e;
            }
            l = warp_sum(l);
            // Every lane has read smax[g] above before lane 0 replaces it.
            __syncwarp();
            if (lane == 0) {
                const float f = smax[g] == NEG_INF ? 0.f : expf(smax[g] - m);
                sfac[g] = f;
                ssum[g] = ssum[g] * f + l;
                smax[g] = m;
            }
        }
        __syncthreads();

        // Weighted V: thread i owns (head g, dim i % d) for every chunk, so its running sum in
        // `out` is private; consecutive threads read consecutive dims.
        for (int idx = threadIdx.x; idx < group * d; idx += blockDim.x) {
            const int g = idx / d, i = idx % d;
            const float* w = scores + g * P.part;
            float acc = out[idx] * sfac[g];
            for (int j = 0; j < n; ++j) {
                int r = phys[j];
                if (r >= 0) acc += w[j] * LOADV(v, ((size_t)r * P.kv_heads + kvh) * d + i);
            }
            out[idx] = acc;
        }
        // The next chunk overwrites the scores, rows and factors.
        __syncthreads();
    }
    for (int g = threadIdx.x; g < group; g += blockDim.x) {
        part_m[ml + g] = smax[g];
        part_l[ml + g] = ssum[g];
    }
}

// Adds each slot's attention probability, summed over the group's heads, into
// mass[mass_off + slot], given the merged statistics from `layerkv_attn_reduce`.
template <typename T, float (*LOAD)(const T*, size_t)>
__device__ void attn_mass(Params P, const float* q, const T* k, const int* row_seq,
                          const int* seq_info, const unsigned int* pages,
                          const unsigned long long* valid, const float* row_m,
                          const float* row_l, float* mass) {
    extern __shared__ float smem[];
    const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int group = P.heads / P.kv_heads, d = P.head_dim;
    float* scores = smem;
    float* sq = scores + group * P.part;
    int* phys = (int*)(sq + group * d);
    int seq, lo, hi;
    if (!block_range(P, row_seq, seq_info, row, split, &seq, &lo, &hi)) return;
    const int* si = seq_info + seq * SEQ_INFO;
    load_queries(P, q, row, kvh, group, sq);
    __syncthreads();
    const size_t ml = (size_t)row * P.heads + (size_t)kvh * group;
    for (int c0 = lo; c0 < hi; c0 += P.part) {
        const int c1 = min(c0 + P.part, hi);
        block_scores<T, LOAD>(P, k, pages, valid, si, kvh, group, c0, c1, sq, scores, phys);
        __syncthreads();
        for (int j = threadIdx.x; j < c1 - c0; j += blockDim.x) {
            if (phys[j] < 0) continue;
            float w = 0.f;
            for (int g = 0; g < group; ++g) {
                float l = row_l[ml + g];
                if (l > 0.f) w += expf(scores[g * P.part + j] - row_m[ml + g]) / l;
            }
            atomicAdd(mass + si[SI_MASS_OFF] + c0 + j, w);
        }
        // The next chunk overwrites the scores and rows.
        __syncthreads();
    }
}

// Partial attention of K pages TK and V pages TV. Entry points are named by the page type when
// K and V share it (`layerkv_attn_partial_f16`), by K's then V's type otherwise
// (`layerkv_attn_partial_q8_0_q4_0`); the mass pass reads keys only and is named by K's type.
#define INSTANTIATE_PARTIAL(NAME, TK, LOADK, TV, LOADV)                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 4) layerkv_attn_partial_##NAME(         \
        Params P, const float* q, const TK* k, const TV* v, const int* row_seq,                \
        const int* seq_info, const unsigned int* pages, const unsigned long long* valid,       \
        float* part_out, float* part_m, float* part_l) {                                       \
        attn_partial<TK, LOADK, TV, LOADV>(P, q, k, v, row_seq, seq_info, pages, valid,        \
                                           part_out, part_m, part_l);                          \
    }

#define INSTANTIATE_MASS(NAME, T, LOAD)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, 4) layerkv_attn_mass_##NAME(            \
        Params P, const float* q, const T* k, const int* row_seq, const int* seq_info,         \
        const unsigned int* pages, const unsigned long long* valid, const float* row_m,        \
        const float* row_l, float* mass) {                                                     \
        attn_mass<T, LOAD>(P, q, k, row_seq, seq_info, pages, valid, row_m, row_l, mass);      \
    }

#define U16 unsigned short
#define U8 unsigned char

INSTANTIATE_PARTIAL(f32, float, load_f32, float, load_f32)
INSTANTIATE_PARTIAL(f16, U16, load_f16, U16, load_f16)
INSTANTIATE_PARTIAL(bf16, U16, load_bf16, U16, load_bf16)
INSTANTIATE_PARTIAL(q8_0, U8, load_q8_0, U8, load_q8_0)
INSTANTIATE_PARTIAL(q4_0, U8, load_q4_0, U8, load_q4_0)
// f16, Q8_0 and Q4_0 pair freely, as on the CPU.
INSTANTIATE_PARTIAL(q8_0_q4_0, U8, load_q8_0, U8, load_q4_0)
INSTANTIATE_PARTIAL(q4_0_q8_0, U8, load_q4_0, U8, load_q8_0)
INSTANTIATE_PARTIAL(f16_q8_0, U16, load_f16, U8, load_q8_0)
INSTANTIATE_PARTIAL(f16_q4_0, U16, load_f16, U8, load_q4_0)
INSTANTIATE_PARTIAL(q8_0_f16, U8, load_q8_0, U16, load_f16)
INSTANTIATE_PARTIAL(q4_0_f16, U8, load_q4_0, U16, load_f16)
// e4m3 pairs only with itself (mistral.rs's and vLLM's fp8 caches hold K and V alike).
INSTANTIATE_PARTIAL(e4m3, U8, load_e4m3, U8, load_e4m3)

INSTANTIATE_MASS(f32, float, load_f32)
INSTANTIATE_MASS(f16, U16, load_f16)
INSTANTIATE_MASS(bf16, U16, load_bf16)
INSTANTIATE_MASS(q8_0, U8, load_q8_0)
INSTANTIATE_MASS(q4_0, U8, load_q4_0)
INSTANTIATE_MASS(e4m3, U8, load_e4m3)

// Merges the splits of one (row, head): out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// Also writes the merged max and sum for the mass pass. Grid (total_q, heads), any block size.
extern "C" __global__ void layerkv_attn_reduce(Params P, const float* part_out,
                                               const float* part_m, const float* part_l,
                                               float* out, float* row_m, float* row_l) {
    const int row = blockIdx.x, h = blockIdx.y, d = P.head_dim;
    const size_t stride = (size_t)P.total_q * P.heads;
    const size_t rh = (size_t)row * P.heads + h;
    float m = NEG_INF;
    for (int s = 0; s < P.num_splits; ++s) m = fmaxf(m, part_m[s * stride + rh]);
    float l = 0.f;
    if (m != NEG_INF)
        for (int s = 0; s < P.num_splits; ++s)
            l += part_l[s * stride + rh] * expf(part_m[s * stride + rh] - m);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        if (l > 0.f)
            for (int s = 0; s < P.num_splits; ++s) {
                float ms = part_m[s * stride + rh];
                if (ms != NEG_INF) acc += part_out[(s * stride + rh) * d + i] * expf(ms - m);
            }
        out[rh * d + i] = l > 0.f ? acc / l : 0.f;
    }
    if (threadIdx.x == 0) {
        row_m[rh] = m;
        row_l[rh] = l;
    }
}

// KvStore::write: dst row rows[i] (of `row` elements) = src row i. Grid (n), any block size.
extern "C" __global__ void layerkv_scatter_rows_u32(unsigned int* dst, const unsigned int* src,
                                                    const unsigned int* rows, int row) {
    const size_t d = (size_t)rows[blockIdx.x] * row, s = (size_t)blockIdx.x * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) dst[d + i] = src[s + i];
}

extern "C" __global__ void layerkv_scatter_rows_u16(unsigned short* dst,
                                                    const unsigned short* src,
                                                    const unsigned int* rows, int row) {
    const size_t d = (size_t)rows[blockIdx.x] * row, s = (size_t)blockIdx.x * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) dst[d + i] = src[s + i];
}

// Block pages are bytes (rows of whole blocks).
extern "C" __global__ void layerkv_scatter_rows_u8(unsigned char* dst, const unsigned char* src,
                                                   const unsigned int* rows, int row) {
    const size_t d = (size_t)rows[blockIdx.x] * row, s = (size_t)blockIdx.x * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) dst[d + i] = src[s + i];
}

// KvStore::copy_page: buf[dst + i] = buf[src + i] for i < n (non-overlapping pages).
extern "C" __global__ void layerkv_copy_u32(unsigned int* buf, unsigned long long src,
                                            unsigned long long dst, unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        buf[dst + i] = buf[src + i];
}

extern "C" __global__ void layerkv_copy_u16(unsigned short* buf, unsigned long long src,
                                            unsigned long long dst, unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        buf[dst + i] = buf[src + i];
}

extern "C" __global__ void layerkv_copy_u8(unsigned char* buf, unsigned long long src,
                                           unsigned long long dst, unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        buf[dst + i] = buf[src + i];
}
