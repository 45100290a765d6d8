// Q8_0 rows and R16 (repacked MXFP4) groups times bf16 activations on AMX-BF16 tiles, dequantizing straight into
// them: the prompts' products without a bf16 copy of the matrix written out to memory and read back by a GEMM (the
// dequantize + oneDNN path, `bf16_gemm_min_t`). The values are that path's: each weight is its exact bf16 value
// (`r16_block_bf16`, `q8_0_block_bf16`), each activation its bf16 value, the products summed in float32 (the
// order differs: the tiles add 32 products at a time along a row), the sum rounded to bf16 as F.linear's output is.
#if DS4PY_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define DS4PY_AMX 1
#else
#define DS4PY_AMX 0
#endif

namespace {
#if DS4PY_AMX
// Linux hands a process the tiles' 8 KB of state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); oneDNN asks the same way.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: float32 sums, 16 weight rows x 16 tokens; tmm4-5: two groups' 16 rows x 32 bf16 weights; tmm6-7: two
// tiles of 16 tokens, their 32 bf16 values as 16 pairs a row (the layout TDPBF16PS multiplies by)
constexpr int64_t KC = 16;  // blocks of 32 values per pass of the token tiles
constexpr int64_t SP = 8;   // pairs of 16-row groups per pass

void configure_tiles() {
  TileConfig c;
  for (int i = 0; i < 8; i++) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

// x [T, n] bf16 -> xt [tiles][n / 2][16][2]: tile j's token tt, values 2i and 2i + 1, at ((j * n / 2 + i) * 16 +
// tt) * 2 (tokens past T are 0). So a block b of 32 values of tile j is the 1 KB from (j * n / 2 + 16 b) * 32.
void pack_tokens(const uint16_t* x, int64_t T, int64_t n, int64_t tiles, uint32_t* xt) {
  const int64_t half = n / 2;
  at::parallel_for(0, tiles, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
      uint32_t* o = xt + j * half * 16;
      const uint32_t* src[16];  // rows past T read as 0
      static const uint32_t zeros[1] = {0};
      int64_t step[16];
      for (int tt = 0; tt < 16; tt++) {
        const int64_t t = j * 16 + tt;
        src[tt] = t < T ? (const uint32_t*)(x + t * n) : zeros;
        step[tt] = t < T;
      }
      for (int64_t i = 0; i < half; i++)  // one 64-byte row of xt at a time, from 16 sequential reads
        for (int tt = 0; tt < 16; tt++) o[i * 16 + tt] = src[tt][i * step[tt]];
    }
  });
}

// The 16 rows x 32 values of block b of Q8_0 rows r0.. (row r at w + r * wstride) as bf16 rows of 32 at o, rows
// from `rows` on as 0 (dequantize's `q8_0_block_bf16`, the exact bf16 of each product)
inline void q8_0_block_tile(const uint8_t* w, int64_t wstride, int64_t r0, int64_t rows, int64_t b, uint16_t* o) {
  for (int r = 0; r < 16; r++) {
    if (r0 + r < rows) q8_0_block_bf16(w + (r0 + r) * wstride + b * 34, o + r * 32);
    else std::memset(o + r * 32, 0, 64);
  }
}

// The float32 sums of 16 weight rows x 16 tokens (a stored tile) into y [T, rows] as bf16 (rounded as
// float_to_bf16), rows from n0, tokens from t0 (those past T, or rows past `rows`, left out): each token's 16 sums
// gathered from the tile's column.
inline void store_sums(const float* c, uint16_t* y, int64_t T, int64_t rows, int64_t t0, int64_t n0) {
  const int64_t nr = std::min<int64_t>(16, rows - n0);
  if (nr <= 0) return;  // (a pair's absent second group)
  const __mmask16 m = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
  for (int tt = 0; tt < 16 && t0 + tt < T; tt++)
    _mm256_mask_storeu_epi16(y + (t0 + tt) * rows + n0, m, bf16x16(_mm512_i32gather_ps(column, c + tt, 4)));
}

// One thread's fills in their order (below: runs of spn pairs from p0, each run's passes of KC blocks, each pass's
// pairs, each pair's blocks), walked one pair-block at a time
struct FillOrder {
  int64_t p1, spn, nb;
  int64_t s0, k0 = 0, q = 0, i = 0, count = 0;  // the run's first pair, the pass's first block, the pair, the block
  bool more() const { return s0 < p1; }
  int64_t pair() const { return s0 + q; }
  int64_t block() const { return k0 + i; }
  void next() {
    count++;
    if (++i < std::min<int64_t>(KC, nb - k0)) return;
    i = 0;
    if (++q < std::min<int64_t>(spn, p1 - s0)) return;
    q = 0;
    k0 += KC;
    if (k0 < nb) return;
    k0 = 0;
    s0 += spn;
  }
};

// y [T, rows] bf16 = x [T, n] bf16 @ W.T on AMX-BF16 tiles, W's 16-row groups' blocks of 32 values made by
// fill(g, b, o) (16 rows x 32 bf16 at o; rows past `rows` as 0) as the first token tiles need them, touch(g, b)
// prefetching what fill(g, b, .) will read.
template <class Fill, class Touch>
void amx_linear(const uint16_t* x, int64_t T, int64_t n, int64_t rows, uint16_t* y, Fill fill, Touch touch) {
  const int64_t nb = n / 32, groups = (rows + 15) / 16, tiles = (T + 15) / 16 + ((T + 15) / 16) % 2;
  std::vector<uint32_t> xt(tiles * (n / 2) * 16);
  pack_tokens(x, T, n, tiles, xt.data());
  const int64_t pairs = (groups + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    configure_tiles();
    // SP pairs of groups at a time: per pass of KC blocks their weights as A tiles (panel[q][h][b]: pair q's group
    // h, 16 rows x 32 bf16 of block b, 1 KB), each token pair's B tiles (32 KB) meeting all SP pairs while in L1,
    // so the packed tokens stream from memory once per SP pairs and pass; the sums wait in acc between passes
    // (up to 4 token tiles, one pair at a time: there the packed tokens are at most 32 KB a pass, and SP = 8 was
    // 0.83-0.95x slower, alternated; at T = 128-255 it was 1.10-1.20x faster for the large Q8_0 matrices)
    const int64_t spn = tiles <= 4 ? 1 : SP;
    std::vector<uint16_t> panel(spn * 2 * KC * 512);
    std::vector<float> acc(spn * tiles * 512);  // [spn][tiles / 2][4 tiles][16 rows x 16 tokens]
    // The weights kept one pass of pair-blocks ahead of the fills, into L2 (touch: prefetcht1), up to two
    // pair-blocks a step of the tiles: the lead is built in a thread's first pass, then each fill's step asks for
    // the block a pass later, so a pass's fills find their weights on the way instead of waiting for memory.
    // (Spreading the next pass's prefetches over all of a pass's steps instead: 1.00-1.05x, not kept.) Cold weights (as
    // in a model), alternated with the build without it: R16 2048 x 4096 at T = 16-255 1.00-1.17x faster, Q8_0
    // 4096 x 4096 0.95-1.00x; flash-slice-few's prompts, two runs of alternated rounds: pp512 1.084x and 1.073x
    // (8 rounds each), pp256 1.026x, pp128 1.033x and 1.014x (10 rounds each); the same logits
    FillOrder ahead{p1, spn, nb, p0};
    int64_t filled = 0;
    auto prefetch = [&] {
      for (int m = 0; m < 2 && ahead.count < filled + spn * KC && ahead.more(); m++, ahead.next()) {
        touch(2 * ahead.pair(), ahead.block());
        if (2 * ahead.pair() + 1 < groups) touch(2 * ahead.pair() + 1, ahead.block());
      }
    };
    for (int64_t s0 = p0; s0 < p1; s0 += spn) {
      const int64_t sp = std::min<int64_t>(spn, p1 - s0);
      for (int64_t k0 = 0; k0 < nb; k0 += KC) {
        const int64_t kn = std::min<int64_t>(KC, nb - k0);
        for (int64_t j = 0; j < tiles; j += 2) {
          const uint32_t* b0 = xt.data() + (j * (n / 2) + 16 * k0) * 16;
          const uint32_t* b1 = b0 + (n / 2) * 16;
          for (int64_t q = 0; q < sp; q++) {
            const int64_t p = s0 + q;
            const bool second = 2 * p + 1 < groups;
            uint16_t* a0 = panel.data() + q * 2 * KC * 512;
            uint16_t* a1 = a0 + KC * 512;
            if (j == 0 && !second) std::memset(a1, 0, KC * 1024);
            float* c = acc.data() + (q * tiles + j) * 512;
            if (k0 == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c, 64);
              _tile_loadd(1, c + 256, 64);
              _tile_loadd(2, c + 512, 64);
              _tile_loadd(3, c + 768, 64);
            }
            for (int64_t b = 0; b < kn; b++) {
              if (j == 0) {  // the first tokens' pass dequantizes each block as it goes (while the tiles work)
                fill(2 * p, k0 + b, a0 + b * 512);
                if (second) fill(2 * p + 1, k0 + b, a1 + b * 512);
                filled++;
              }
              prefetch();
              _tile_loadd(4, a0 + b * 512, 64);
              _tile_loadd(5, a1 + b * 512, 64);
              _tile_loadd(6, b0 + b * 256, 64);
              _tile_loadd(7, b1 + b * 256, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, 64);
            _tile_stored(1, c + 256, 64);
            _tile_stored(2, c + 512, 64);
            _tile_stored(3, c + 768, 64);
          }
        }
      }
      for (int64_t q = 0; q < sp; q++)
        for (int64_t j = 0; j < tiles; j += 2) {
          const float* c = acc.data() + (q * tiles + j) * 512;
          const int64_t n0 = 32 * (s0 + q);
          store_sums(c, y, T, rows, j * 16, n0);
          store_sums(c + 256, y, T, rows, j * 16 + 16, n0);
          store_sums(c + 512, y, T, rows, j * 16, n0 + 16);
          store_sums(c + 768, y, T, rows, j * 16 + 16, n0 + 16);
        }
    }
    _tile_release();
  });
}
#endif
}  // namespace

// y [T, rows] bf16 = x [T, n] bf16 @ W.T for W Q8_0 rows (row r at w + r * wstride) or R16 groups (rows % 16 == 0),
// n % 32 == 0, on AMX-BF16 tiles. Returns 0, or 1 where this build or this CPU has no AMX, or for another qtype
// (the caller takes the dequantize + GEMM path).
extern "C" int ds4py_amx_linear(int qtype, const uint16_t* x, int64_t T, int64_t n, const uint8_t* w,
                                int64_t wstride, int64_t rows, uint16_t* y) {
#if DS4PY_AMX
  if (n % 32 || (qtype != Q8_0 && qtype != MXFP4_R16) || (qtype == MXFP4_R16 && rows % 16) || !amx_permitted())
    return 1;
  if (T == 0 || rows == 0) return 0;
  const int64_t nb = n / 32;
  if (qtype == MXFP4_R16)
    amx_linear(x, T, n, rows, y, [&](int64_t g, int64_t b, uint16_t* o) {
      r16_block_bf16(w + (g * nb + b) * R16_BLOCK, o, 32);  // (the A tile's rows of 32)
    }, [&](int64_t g, int64_t b) {
      const char* blk = (const char*)(w + (g * nb + b) * R16_BLOCK);
      for (int64_t i = 0; i < R16_BLOCK; i += 64) _mm_prefetch(blk + i, _MM_HINT_T1);
      _mm_prefetch(blk + R16_BLOCK - 1, _MM_HINT_T1);
    });
  else
    amx_linear(x, T, n, rows, y, [&](int64_t g, int64_t b, uint16_t* o) {
      q8_0_block_tile(w, wstride, 16 * g, rows, b, o);
    }, [&](int64_t g, int64_t b) {  // each row's block ends (the starts: the previous block's, or the first's)
      for (int64_t r = 16 * g; r < std::min<int64_t>(16 * g + 16, rows); r++) {
        const char* blk = (const char*)(w + r * wstride + b * 34);
        if (b == 0) _mm_prefetch(blk, _MM_HINT_T1);
        _mm_prefetch(blk + 33, _MM_HINT_T1);
      }
    });
  return 0;
#else
  (void)qtype, (void)x, (void)T, (void)n, (void)w, (void)wstride, (void)rows, (void)y;
  return 1;
#endif
}
