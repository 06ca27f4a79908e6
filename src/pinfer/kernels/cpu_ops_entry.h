#pragma once

#include <cstring>

// The tensor-level entry points of the ops that both kernel files build (cpu_ops.cpp with
// AVX-512, cpu_ops_avx2.cpp with AVX2): argument checks, output allocation and the dtype
// dispatch; the KV store (plain copies) and the decoder stack, which only calls other ops.
// Each file defines the row kernels declared here with its own vectors and includes this
// inside its anonymous namespace, after `using bf16 = at::BFloat16;`.

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
// x_scale = max|x| / 127 and xq = round(x / x_scale) (half to even), + offset mod 256: one row's
// int8 quantization (int8 linears), x_scale returned
template <typename T>
float quantize_row(const T* x, int64_t k_dim, int8_t* xq, int8_t offset = 0);
// query [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]; context_lens [B]
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window);

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

// ---- writing the new tokens' K and V into their pool slots ---------------------------------
// Plain copies: the same code for every CPU.

// slot_mapping as a contiguous int64 tensor, every slot checked to lie in a pool of cache's blocks
at::Tensor checked_slots(const at::Tensor& slot_mapping, const at::Tensor& cache, const char* name) {
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, name, ": int64 slot_mapping");
  auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = cache.size(0) * cache.size(1);
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, name, ": slot ", slot[t], " outside the pool");
  return slots;
}

// A decode step writes one token per sequence, each to a slot in another block: every row's
// lines miss the caches, and the writes wait on those misses. So the tokens are split between
// the threads (in runs of kStoreGrain), and each prefetches, for writing, the slots kStoreAhead
// tokens on. Serial and without prefetch it took ~1.2 ms a batch-64 step (int8 pools).
constexpr int64_t kStoreGrain = 8, kStoreAhead = 4;

inline void prefetch_for_write(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 1, 3);
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  // key/value [T, Hkv, D], rows may be strided (views of the qkv output); caches [blocks, block_size, Hkv, D]
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  const int64_t row = key.size(1) * key.size(2);
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
              value.stride(1) == value.size(2) && k_cache.size(2) * k_cache.size(3) == row);
  auto slots = checked_slots(slot_mapping, k_cache, "store_kv");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t bytes = row * key.element_size();
  auto* k_src = static_cast<const char*>(key.data_ptr());
  auto* v_src = static_cast<const char*>(value.data_ptr());
  auto* k_dst = static_cast<char*>(k_cache.data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  at::parallel_for(0, key.size(0), kStoreGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t + kStoreAhead < end) {
        prefetch_for_write(k_dst + slot[t + kStoreAhead] * bytes, bytes);
        prefetch_for_write(v_dst + slot[t + kStoreAhead] * bytes, bytes);
      }
      std::memcpy(k_dst + slot[t] * bytes, k_src + t * k_stride, bytes);
      std::memcpy(v_dst + slot[t] * bytes, v_src + t * v_stride, bytes);
    }
  });
}

// Where threads contiguous ranges of items 0..count of about equal total cost(item) begin
// and end: [threads + 1] bounds.
template <typename Cost>
std::vector<int64_t> equal_work_bounds(int64_t count, int64_t threads, Cost&& cost) {
  int64_t total = 0;
  for (int64_t item = 0; item < count; ++item) total += cost(item);
  std::vector<int64_t> bounds(threads + 1, count);
  bounds[0] = 0;
  int64_t done = 0, t = 1;
  for (int64_t item = 0; item < count && t < threads; ++item) {
    done += cost(item);
    while (t < threads && done * threads >= total * t) bounds[t++] = item + 1;
  }
  return bounds;
}

// paged_prefill_attention_batch's sequences, seqs [B, 4] int64 (row of block_tables, first
// query row, q_len, context_len), each checked against the tables and the query's rows.
inline void check_prefill_seqs(const int64_t* s, int64_t count, const at::Tensor& tables, int64_t query_rows,
                               int64_t block_size) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = s[4 * i], start = s[4 * i + 1], q_len = s[4 * i + 2], context_len = s[4 * i + 3];
    TORCH_CHECK(row >= 0 && row < tables.size(0) && start >= 0 && q_len >= 1 && start + q_len <= query_rows &&
                context_len >= q_len && tables.size(1) * block_size >= context_len,
                "paged_prefill_attention_batch: sequence ", i, " (table row ", row, ", rows ", start, "+", q_len,
                ", context ", context_len, ") out of range");
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  // x [M, K] float32/bf16 -> (xq int8 [M, K], x_scale float32 [M, 1])
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantize_rows: x [M, K] contiguous");
  const int64_t rows = x.size(0), k_dim = x.size(1);
  auto xq = at::empty({rows, k_dim}, x.options().dtype(at::kChar));
  auto scales = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  PINFER_DISPATCH(x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        scales.data_ptr<float>()[r] = quantize_row(xp + r * k_dim, k_dim, xq.data_ptr<int8_t>() + r * k_dim);
    });
  });
  return {xq, scales};
}

// ---- a decode step's whole decoder stack ------------------------------------------------------
// What model/llama.py's Llama-family layers run when every sequence feeds one token, as the
// kernels' ops in the same order, so the same bits: the Python path spends ~25 interpreter-level
// calls per layer around them, ~5 ms of a 15 ms batch-1 token on 2 cores. Layers without q/k
// norms or experts, bf16, every linear of one kind below (the caller checks).
// weights: per layer qkv, o, gate_up, down, each as the linear's kind holds it: bf16 packed
// (1 tensor), int8 (3: packed, row sums, scales) or int4 (1: packed with its scales, for
// int4_gemm). biases: per layer 4, empty for none.
// norms: per layer input and post-attention, then the final norm.
enum LinearKind : int64_t { kBf16 = 0, kInt8 = 1, kInt4 = 2 };
constexpr int64_t kTensorsPerLinear[] = {1, 3, 1};

// Each kernel file defines these two for the linear kinds and pools it has (checking the rest):
// a linear of the stack, and a layer's KV store and decode attention (int8 pools where k_scale
// is defined). decode_layers is inline, so a file that does not register it needs neither.
at::Tensor stack_linear(const at::Tensor& x, at::TensorList weights, int64_t first, int64_t kind,
                        const at::Tensor& bias);
at::Tensor stack_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& k_scale, const at::Tensor& v_scale,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale, int64_t sliding_window);

// hidden is the first residual, updated in place, as the module path does with the embedding output
constexpr char kDecodeLayersSchema[] =
    "decode_layers(Tensor(c!) hidden, Tensor positions, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
    "Tensor(d!)[] k_scales, Tensor(e!)[] v_scales, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
    "Tensor cos, Tensor sin, Tensor[] norms, Tensor[] weights, Tensor[] biases, int kind, int num_heads, "
    "int num_kv_heads, int head_dim, float eps, float scale, int sliding_window) -> Tensor";

inline at::Tensor decode_layers(const at::Tensor& hidden_in, const at::Tensor& positions, at::TensorList k_caches,
                         at::TensorList v_caches, at::TensorList k_scales, at::TensorList v_scales,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const at::Tensor& cos, const at::Tensor& sin,
                         at::TensorList norms, at::TensorList weights, at::TensorList biases, int64_t kind,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                         double scale, int64_t sliding_window) {
  TORCH_CHECK(kind >= kBf16 && kind <= kInt4, "decode_layers: linear kind ", kind);
  const int64_t layers = static_cast<int64_t>(k_caches.size()), per_linear = kTensorsPerLinear[kind];
  TORCH_CHECK(v_caches.size() == k_caches.size() && norms.size() == 2 * k_caches.size() + 1 &&
              static_cast<int64_t>(weights.size()) == 4 * per_linear * layers && biases.size() == 4 * k_caches.size(),
              "decode_layers: ", layers, " layers need 2 per layer + 1 norms, 4 linears and 4 biases per layer");
  // int8 KV pools (Int8KV) come with their scale pools; else the scale lists are empty
  const bool int8_pools = !k_scales.empty();
  TORCH_CHECK(!int8_pools || (k_scales.size() == k_caches.size() && v_scales.size() == k_caches.size()),
              "decode_layers: one k and v scale pool per layer");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, tokens = hidden_in.size(0);
  at::Tensor residual = hidden_in;
  at::Tensor hidden = rms_norm(hidden_in, norms[0], eps);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = 4 * per_linear * l;
    if (l > 0) hidden = add_rms_norm(hidden, residual, norms[2 * l], eps);
    at::Tensor qkv = stack_linear(hidden, weights, w, kind, biases[4 * l]);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
    rotary_(q, k, cos, sin, positions);
    const at::Tensor attn =
        stack_attention(q, k, v, k_caches[l], v_caches[l], int8_pools ? k_scales[l] : at::Tensor(),
                        int8_pools ? v_scales[l] : at::Tensor(), slot_mapping, block_tables, context_lens, scale,
                        sliding_window);
    at::Tensor o =
        stack_linear(attn.reshape({tokens, q_size}), weights, w + per_linear, kind, biases[4 * l + 1]);
    hidden = add_rms_norm(o, residual, norms[2 * l + 1], eps);
    at::Tensor gate_up = stack_linear(hidden, weights, w + 2 * per_linear, kind, biases[4 * l + 2]);
    hidden = stack_linear(silu_mul(gate_up), weights, w + 3 * per_linear, kind, biases[4 * l + 3]);
  }
  return add_rms_norm(hidden, residual, norms[2 * layers], eps);
}

// The schemas of the ops above and of paged_decode_attention: each file that includes this
// registers them here, so the two builds cannot disagree on one.
inline void define_entry_ops(torch::Library& m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("rotary_(Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin, Tensor positions) -> ()", &rotary_);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("gumbel_sample(Tensor logits, Tensor temperature, Tensor row_keys, bool processed) -> (Tensor, Tensor, Tensor)",
        &gumbel_sample);
  m.def("argmax(Tensor logits) -> Tensor", &argmax);
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)", &quantize_rows);
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &store_kv);
  m.def("paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int sliding_window) -> Tensor", &paged_decode_attention);
}
