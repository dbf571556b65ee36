// y[M, F] = x[M, D] @ w[D, F] for few rows (a decode step), float32, as an XLA FFI CPU handler.
//
// At a handful of rows this product is bound by reading w, yet general matmul kernels, built for
// many rows, read it at half of memory speed or less (XLA's, numpy's and torch's alike on a
// 2-core machine). This kernel reads w where it lies (t5x's [in, out] layout), one 64-column tile
// at a time over all D rows, with a register tile of up to 8 rows x 64 columns. Its strided row
// reads arrive in time because it prefetches, along each row, the tile two ahead, and down the
// first tile of a range, 16 rows ahead. Tiles are split into contiguous ranges over XLA's
// intra-op threads.
#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

constexpr int64_t kTile = 64;         // columns per tile: 4 vectors of 16 floats
constexpr int64_t kRows = 8;          // rows per register tile
constexpr int64_t kAheadTiles = 2;    // prefetch distance along a row, in tiles
constexpr int64_t kAheadRows = 16;    // prefetch distance down the first tile of a range

inline void prefetch_tile_row(const float* p) {
  for (int i = 0; i < kTile; i += 16) __builtin_prefetch(p + i, 0, 2);
}

// Full tiles [t0, t1) for rows [m0, m0 + MR).
template <int MR>
void tiles(const float* x, const float* w, float* y, int64_t D, int64_t F, int64_t m0,
           int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    v16 acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int q = 0; q < 4; ++q) acc[m][q] = v16{};
    const float* col = w + t * kTile;
    const bool first = t == t0;
    const bool ahead = t + kAheadTiles < t1;
    for (int64_t d = 0; d < D; ++d) {
      const float* row = col + d * F;
      if (ahead) prefetch_tile_row(row + kAheadTiles * kTile);
      if (first && d + kAheadRows < D) prefetch_tile_row(row + kAheadRows * F);
      if (first && t + 1 < t1) prefetch_tile_row(row + kTile);
      const v16* v = reinterpret_cast<const v16*>(row);
      const v16 w0 = v[0], w1 = v[1], w2 = v[2], w3 = v[3];
      for (int m = 0; m < MR; ++m) {
        const float s = x[(m0 + m) * D + d];
        acc[m][0] += s * w0;
        acc[m][1] += s * w1;
        acc[m][2] += s * w2;
        acc[m][3] += s * w3;
      }
    }
    for (int m = 0; m < MR; ++m) {
      v16* out = reinterpret_cast<v16*>(y + (m0 + m) * F + t * kTile);
      for (int q = 0; q < 4; ++q) out[q] = acc[m][q];
    }
  }
}

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);
constexpr TileFn kTileFns[kRows] = {tiles<1>, tiles<2>, tiles<3>, tiles<4>,
                                    tiles<5>, tiles<6>, tiles<7>, tiles<8>};

// Full tiles [t0, t1) for all M rows, in register tiles of up to kRows rows. Over kRows rows
// (beams x batch) each tile is done for every row block before the next tile, so that it is
// read from memory once (a tile of a 1024-row kernel is 256 KiB) and from cache by the other
// blocks, rather than the whole range once per block.
void tile_range(const float* x, const float* w, float* y, int64_t M, int64_t D, int64_t F,
                int64_t t0, int64_t t1) {
  if (M <= kRows) {
    if (M > 0) kTileFns[M - 1](x, w, y, D, F, 0, t0, t1);
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t mr = std::min(kRows, M - m0);
      kTileFns[mr - 1](x, w, y, D, F, m0, t, t + 1);
    }
  }
}

// The last F % 64 columns.
void tail_columns(const float* x, const float* w, float* y, int64_t M, int64_t D, int64_t F) {
  for (int64_t f0 = F / kTile * kTile, m = 0; m < M; ++m) {
    float* out = y + m * F;
    for (int64_t f = f0; f < F; ++f) out[f] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float s = x[m * D + d];
      const float* row = w + d * F;
      for (int64_t f = f0; f < F; ++f) out[f] += s * row[f];
    }
  }
}

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "gqa_small_matmul: expected x [M, D], w [D, F] and y [M, F]");
  }
  const int64_t M = xd[0], D = xd[1], F = wd[1], num_tiles = F / kTile;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // Contiguous ranges of tiles, none under 4 tiles of a 512-row kernel (512 KiB of weights).
  const int64_t parts = std::min(num_tiles, gqa_t5x::NumParts(pool, D * num_tiles, 4 * 512));
  gqa_t5x::ParallelFor(pool, parts, [=](int64_t p) {
    tile_range(xp, wp, yp, M, D, F, num_tiles * p / parts, num_tiles * (p + 1) / parts);
  });
  if (F % kTile) tail_columns(xp, wp, yp, M, D, F);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
