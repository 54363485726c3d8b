// The CPU's decode LoRA op (see cpu_lora.py): for each row i with a slot, in place,
//   shrunk[i] = x[i] @ A[slot_i]                    (the whole A stack's width; only when asked)
//   y[i]     += shrunk[i, first:first+rank] @ B[slot_i, :rank]
// reading each row's adapter in place from the slot stacks, in one pass and one call per linear.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

// s = x[0:in] @ a[in, W], with four accumulator sets so consecutive FMAs do not wait on each other.
template <int W>
void shrink_fixed(const float* __restrict x, const float* __restrict a, int64_t in, float* __restrict s) {
  float acc[4][W] = {};
  int64_t k = 0;
  for (; k + 4 <= in; k += 4) {
    for (int u = 0; u < 4; ++u) {
      const float xk = x[k + u];
      const float* __restrict ak = a + (k + u) * W;
#pragma omp simd
      for (int w = 0; w < W; ++w) acc[u][w] += xk * ak[w];
    }
  }
  for (; k < in; ++k) {
    const float xk = x[k];
    const float* __restrict ak = a + k * W;
#pragma omp simd
    for (int w = 0; w < W; ++w) acc[0][w] += xk * ak[w];
  }
#pragma omp simd
  for (int w = 0; w < W; ++w) s[w] = (acc[0][w] + acc[1][w]) + (acc[2][w] + acc[3][w]);
}

void shrink_any(const float* __restrict x, const float* __restrict a, int64_t in, int64_t width,
                float* __restrict s) {
  std::fill(s, s + width, 0.f);
  for (int64_t k = 0; k < in; ++k) {
    const float xk = x[k];
    const float* __restrict ak = a + k * width;
#pragma omp simd
    for (int64_t w = 0; w < width; ++w) s[w] += xk * ak[w];
  }
}

void shrink(const float* x, const float* a, int64_t in, int64_t width, float* s) {
  switch (width) {  // the stack widths of max_rank 8/16/32 with 1-3 linears sharing an input
    case 8: return shrink_fixed<8>(x, a, in, s);
    case 16: return shrink_fixed<16>(x, a, in, s);
    case 24: return shrink_fixed<24>(x, a, in, s);
    case 32: return shrink_fixed<32>(x, a, in, s);
    case 48: return shrink_fixed<48>(x, a, in, s);
    case 64: return shrink_fixed<64>(x, a, in, s);
    case 96: return shrink_fixed<96>(x, a, in, s);
    default: return shrink_any(x, a, in, width, s);
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
  TORCH_CHECK(0 <= rank && rank <= max_rank && 0 <= first && first + max_rank <= width, "bad rank or columns");
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
      if (compute_shrink) shrink(xp + i * in, ap + slot * in * width, in, width, s);
      expand_add(s + first, bp + slot * max_rank * out, rank, out, yp + i * out);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lora_decode_", &lora_decode_); }
