#pragma once

// The tensor-level entry points of the ops that both kernel files build (cpu_ops.cpp with
// AVX-512, cpu_ops_avx2.cpp with AVX2): argument checks, output allocation and the dtype
// dispatch. Each file defines the row kernels declared here with its own vectors and includes
// this inside its anonymous namespace, after `using bf16 = at::BFloat16;`.

// float32 and bf16 only (the dtypes the engine runs in); anything else fails the TORCH_CHECK.
#define PINFER_DISPATCH(TYPE, NAME, ...)                                                   \
  [&] {                                                                                   \
    if ((TYPE) == at::kBFloat16) {                                                        \
      using scalar_t = bf16;                                                              \
      __VA_ARGS__();                                                                      \
    } else {                                                                              \
      TORCH_CHECK((TYPE) == at::kFloat, NAME ": float32 or bfloat16 only, got ", (TYPE)); \
      using scalar_t = float;                                                             \
      __VA_ARGS__();                                                                      \
    }                                                                                     \
  }()

template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim, double eps);
template <typename T>
void rotate_heads(T* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride, const float* cos,
                  const float* sin, const int64_t* positions);
template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width);
template <typename T>
void gumbel_sample_rows(const T* logits, int64_t rows, int64_t vocab, const float* temperature, const int32_t* keys,
                        bool processed, int64_t* token_ids, float* chosen_logprobs, int64_t* ranks);
template <typename T>
void argmax_rows(const T* logits, int64_t rows, int64_t vocab, int64_t* out);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == weight.scalar_type());
  auto out = at::empty_like(x);
  int64_t dim = x.size(-1), rows = x.numel() / dim;
  PINFER_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            rows, dim, eps);
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type());
  auto out = at::empty_like(x);
  int64_t dim = x.size(-1), rows = x.numel() / dim;
  PINFER_DISPATCH(x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), rows, dim, eps);
  });
  return out;
}

void rotary_(at::Tensor& query, at::Tensor& key, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions) {
  // query [T, H, D], key [T, Hkv, D]: views of the fused qkv output (rows strided, heads contiguous)
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2) && key.stride(2) == 1 &&
              key.stride(1) == key.size(2));
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat);
  auto pos = positions.contiguous();
  PINFER_DISPATCH(query.scalar_type(), "rotary_", [&] {
    rotate_heads<scalar_t>(query.data_ptr<scalar_t>(), query.size(0), query.size(1), query.size(2), query.stride(0),
                           cos.data_ptr<float>(), sin.data_ptr<float>(), pos.data_ptr<int64_t>());
    rotate_heads<scalar_t>(key.data_ptr<scalar_t>(), key.size(0), key.size(1), key.size(2), key.stride(0),
                           cos.data_ptr<float>(), sin.data_ptr<float>(), pos.data_ptr<int64_t>());
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0);
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = at::empty(sizes, gate_up.options());
  PINFER_DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, width);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_sample(const at::Tensor& logits, const at::Tensor& temperature,
                                                             const at::Tensor& row_keys, bool processed) {
  // logits [B, V]; temperature [B] float32 (> 0); row_keys [B] int32 (sampling/random.py row_keys)
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous());
  auto temp = temperature.to(at::kFloat).contiguous();
  auto keys = row_keys.contiguous();
  TORCH_CHECK(keys.scalar_type() == at::kInt && temp.numel() == logits.size(0) && keys.numel() == logits.size(0));
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab < (int64_t{1} << 31), "vocabulary too large for 32-bit token ids");
  auto token_ids = at::empty({rows}, logits.options().dtype(at::kLong));
  auto chosen = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto ranks = at::empty({rows}, logits.options().dtype(at::kLong));
  PINFER_DISPATCH(logits.scalar_type(), "gumbel_sample", [&] {
    gumbel_sample_rows<scalar_t>(logits.data_ptr<scalar_t>(), rows, vocab, temp.data_ptr<float>(),
                                 keys.data_ptr<int32_t>(), processed, token_ids.data_ptr<int64_t>(),
                                 chosen.data_ptr<float>(), ranks.data_ptr<int64_t>());
  });
  return {token_ids, chosen, ranks};
}

at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "argmax: logits [B, V] contiguous");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  PINFER_DISPATCH(logits.scalar_type(), "argmax", [&] {
    argmax_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.size(0), logits.size(1), out.data_ptr<int64_t>());
  });
  return out;
}
