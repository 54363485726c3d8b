// The CPU's decode LoRA op (see cpu_lora.py): for each row i with a slot, in place,
//   shrunk[i] = x[i] @ A[slot_i]      (every linear's block of the A stack, its first rank columns; when asked)
//   y[i]     += shrunk[i, first:first+rank] @ B[slot_i, :rank]
// reading each row's adapter in place from the slot stacks, in one pass and one call per linear.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

// The shrink of one row against an A stack whose rows hold N linears' blocks of R columns each
// (row width W = N * R): for each block m, s[m*R + r] = x[0:in] @ a[:, m*R + r] for r < COLS, the first
// COLS columns only (COLS >= the batch's rank; the rest of a block is padding), so a rank-16 batch on
// max_rank-64 slots reads a quarter of each row. UNROLL accumulator sets keep consecutive FMAs apart.
template <int N, int COLS, int UNROLL>
void shrink_fixed(const float* __restrict x, const float* __restrict a, int64_t in, int64_t width,
                  int64_t max_rank, float* __restrict s) {
  float acc[UNROLL][N][COLS] = {};
  int64_t k = 0;
  for (; k + UNROLL <= in; k += UNROLL) {
    for (int u = 0; u < UNROLL; ++u) {
      const float xk = x[k + u];
      for (int m = 0; m < N; ++m) {
        const float* __restrict am = a + (k + u) * width + m * max_rank;
#pragma omp simd
        for (int r = 0; r < COLS; ++r) acc[u][m][r] += xk * am[r];
      }
    }
  }
  for (; k < in; ++k) {
    const float xk = x[k];
    for (int m = 0; m < N; ++m) {
      const float* __restrict am = a + k * width + m * max_rank;
#pragma omp simd
      for (int r = 0; r < COLS; ++r) acc[0][m][r] += xk * am[r];
    }
  }
  for (int m = 0; m < N; ++m) {
    for (int r = 0; r < COLS; ++r) {
      float total = 0.f;
      for (int u = 0; u < UNROLL; ++u) total += acc[u][m][r];
      s[m * max_rank + r] = total;
    }
  }
}

void shrink_any(const float* __restrict x, const float* __restrict a, int64_t in, int64_t width,
                int64_t max_rank, int64_t cols, float* __restrict s) {
  const int64_t blocks = width / max_rank;
  for (int64_t m = 0; m < blocks; ++m) std::fill(s + m * max_rank, s + m * max_rank + cols, 0.f);
  for (int64_t k = 0; k < in; ++k) {
    const float xk = x[k];
    for (int64_t m = 0; m < blocks; ++m) {
      const float* __restrict am = a + k * width + m * max_rank;
      float* __restrict sm = s + m * max_rank;
#pragma omp simd
      for (int64_t r = 0; r < cols; ++r) sm[r] += xk * am[r];
    }
  }
}

template <int N>
void shrink_blocks(const float* x, const float* a, int64_t in, int64_t width, int64_t max_rank, int64_t rank,
                   float* s) {
  // The fewest columns a compiled variant covers: 16 floats are one 64-byte cache line.
  if (rank <= 8 && max_rank >= 8) return shrink_fixed<N, 8, 4>(x, a, in, width, max_rank, s);
  if (rank <= 16 && max_rank >= 16) return shrink_fixed<N, 16, 4>(x, a, in, width, max_rank, s);
  if (rank <= 32 && max_rank >= 32) return shrink_fixed<N, 32, (N > 2 ? 2 : 4)>(x, a, in, width, max_rank, s);
  if (rank <= 64 && max_rank >= 64) return shrink_fixed<N, 64, (N > 1 ? 1 : 2)>(x, a, in, width, max_rank, s);
  shrink_any(x, a, in, width, max_rank, rank, s);
}

void shrink(const float* x, const float* a, int64_t in, int64_t width, int64_t max_rank, int64_t rank, float* s) {
  switch (width / max_rank) {  // how many linears share the stack: q/k/v 3, gate/up 2, o and down 1
    case 1: return shrink_blocks<1>(x, a, in, width, max_rank, rank, s);
    case 2: return shrink_blocks<2>(x, a, in, width, max_rank, rank, s);
    case 3: return shrink_blocks<3>(x, a, in, width, max_rank, rank, s);
    default: return shrink_any(x, a, in, width, max_rank, rank, s);
  }
}

// y[0:out] += s[0:rank] @ b[rank, out]: each of B's rows streamed once, y (a few KB) stays in L1.
void expand_add(const float* __restrict s, const float* __restrict b, int64_t rank, int64_t out,
                float* __restrict y) {
  for (int64_t r = 0; r < rank; ++r) {
    const float sr = s[r];
    const float* __restrict br = b + r * out;
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) y[o] += sr * br[o];
  }
}

}  // namespace

// y [B, 1, out] or [B, out], x [B, 1, in] or [B, in], a_rows [S*in, W], b_rows [S*R, out], slots [B] (-1:
// none), shrunk [B, W]: all contiguous float32 (slots int64) on the CPU; the linear's A is columns
// first:first+R of the stack.
void lora_decode_(torch::Tensor y, torch::Tensor x, torch::Tensor a_rows, torch::Tensor b_rows,
                  torch::Tensor slots, torch::Tensor shrunk, int64_t first, int64_t rank, int64_t max_rank,
                  bool compute_shrink) {
  for (const auto& t : {y, x, a_rows, b_rows, shrunk}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() >= 2,
                "lora_decode_: expected contiguous float32 CPU tensors");
  }
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1, "slots: int64 [B]");
  const int64_t rows = x.size(0), in = x.size(-1), width = a_rows.size(1), out = y.size(-1);
  TORCH_CHECK(x.numel() == rows * in && y.numel() == y.size(0) * out, "x and y must hold one token per row");
  TORCH_CHECK(in > 0 && a_rows.size(0) % in == 0, "a_rows must be [S*in, W]");
  const int64_t num_slots = a_rows.size(0) / in;
  TORCH_CHECK(y.size(0) == rows && slots.size(0) == rows && shrunk.size(0) == rows && shrunk.size(1) == width,
              "row counts or the shrink's width do not match");
  TORCH_CHECK(0 <= rank && rank <= max_rank && width % max_rank == 0 && 0 <= first && first % max_rank == 0 &&
                  first + max_rank <= width,
              "bad rank or columns");
  TORCH_CHECK(b_rows.size(0) == num_slots * max_rank && b_rows.size(1) == out, "b_rows must be [S*R, out]");
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(slot_of[i] < num_slots, "slot out of range");

  const float* xp = x.data_ptr<float>();
  const float* ap = a_rows.data_ptr<float>();
  const float* bp = b_rows.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* sp = shrunk.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = slot_of[i];
      if (slot < 0) continue;
      float* s = sp + i * width;
      if (compute_shrink) shrink(xp + i * in, ap + slot * in * width, in, width, max_rank, rank, s);
      expand_add(s + first, bp + slot * max_rank * out, rank, out, yp + i * out);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lora_decode_", &lora_decode_); }
