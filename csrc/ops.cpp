// The one place that declares the schemas of the elastic:: operators.
// CPU and CUDA implementations register themselves with TORCH_LIBRARY_IMPL next to their kernels;
// fake (meta) kernels and autograd are registered from Python (elastic_cuda/ops/, a module per op family).
#include <torch/library.h>

TORCH_LIBRARY(elastic, m) {
  // Hybrid attention: every (batch element, KV head) runs in its own mode
  // (0 FULL causal, 1 STREAM sink+window, 2 BLOCK block-sparse). Semantics: csrc/attention/head_mode.h.
  // Tensor arguments are positional (torch.library.register_autograd needs that).
  // Dense layout: q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D], lse [B, Hq, Sq] (fp32, natural log).
  // Varlen layout (cu_seqlens_q/k given, int32 [B+1]): q [Tq, Hq, D], k/v [Tk, Hkv, D], lse [Hq, Tq].
  // strategy: "auto" | "fused" | "grouped" (CUDA only; the CPU kernel ignores it).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor head_mode, Tensor? block_mask=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, *, int sink=128, int window=2048, "
      "int block_size=128, float? scale=None, int max_seqlen_q=0, int max_seqlen_k=0, "
      "str strategy=\"auto\") -> (Tensor out, Tensor lse)");
  // Gradients of attention for q, k, v. grad_lse may be None (lse not used downstream).
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor head_mode, Tensor? block_mask=None, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, *, int sink=128, int window=2048, int block_size=128, float? scale=None, "
      "int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The router-training mix O = z O_FA + (1 - z) O_SA per (sample, KV head) (z [B, Hkv] float, usually the hard
  // 0/1 of a straight-through router): O_FA is every head FULL, O_SA every head in sparse_mode (1 STREAM, 2 BLOCK
  // with block_mask). Returns out (like q) and both branches with their lse (fp32; the branches are not
  // differentiable). Its autograd (elastic_cuda/ops/_train_mix.py) gives dq, dk, dv and dz = sum(dO * (O_FA - O_SA)) per
  // (sample, KV head), and runs a head's backward only in the branch its z weighs (z == 0 or 1 skips the other).
  // Composite: the same Python implementation over elastic::attention serves CPU and CUDA (on CUDA fp16/bf16 its
  // elementwise work runs as train_mix_combine / train_mix_dz below).
  m.def(
      "train_mix(Tensor q, Tensor k, Tensor v, Tensor z, Tensor? block_mask=None, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, *, int sparse_mode, int sink=128, int window=2048, int block_size=128, "
      "float? scale=None, int max_seqlen_q=0, int max_seqlen_k=0, str strategy=\"auto\") -> (Tensor out, "
      "Tensor out_full, Tensor lse_full, Tensor out_sparse, Tensor lse_sparse)");
  // The training mix's elementwise work as fused kernels (CUDA; CPU kernels are the spec), used by train_mix's
  // forward and backward for fp16/bf16 CUDA tensors (elastic_cuda/ops/_train_mix.py; A/B switch ELASTIC_TRAIN_MIX_FUSED,
  // csrc/attention/kernel_options.h). Rows of [B, S, H, D] or packed [T, H, D] with cu_seqlens int32 [B+1]; a row in
  // no sequence (varlen) gets out 0 and no share of dz. Semantics and limits: csrc/train_mix/train_mix_checks.h.
  // train_mix_combine: out = z * full + (1 - z) * sparse, z [B, Hz] weighing head h by z[b, h / (H / Hz)], each
  // value computed in fp32 (fp64 for fp64) and rounded once to the tensors' dtype (0 * NaN stays NaN).
  m.def(
      "train_mix_combine(Tensor full, Tensor sparse, Tensor z, Tensor? cu_seqlens=None) -> Tensor");
  // train_mix_dz: dz [B, kv_heads] = sum over the rows of batch b, the query heads of KV head h's group and the head
  // dims of grad_out * (out_full - out_sparse), fp32 (fp64 for fp64 inputs); deterministic (no atomics: per-tile
  // partials summed in a fixed order). max_seqlen_q (varlen): the longest sequence (sizes the CUDA grid; a longer
  // one gives NaN for its batch).
  m.def(
      "train_mix_dz(Tensor grad_out, Tensor out_full, Tensor out_sparse, Tensor? cu_seqlens_q=None, *, "
      "int kv_heads, int max_seqlen_q=0) -> Tensor");
  // XAttention block masks of a prefill (CUDA only; the torch rule in elastic_cuda/attention/xattn.py is the CPU
  // path and the reference): q [B, S, Hq, D], k [B, S, Hkv, D] (queries = keys), or packed [T, H, D] with
  // cu_seqlens int32 [B+1] and max_seqlen -> bool [B, Hq, NB, NB], NB = ceil((S or max_seqlen) / block_size).
  // Only KV heads with head_mode == 2 (BLOCK) are estimated; the rows of the other heads are all False.
  // Semantics and limits: csrc/xattn/xattn_cuda_api.cpp.
  m.def(
      "xattn_block_mask(Tensor q, Tensor k, Tensor head_mode, Tensor? cu_seqlens=None, *, int block_size=128, "
      "int stride=16, float threshold=0.9, float? scale=None, int max_seqlen=0) -> Tensor");
  // Decode attention over a static elastic KV cache (elastic_cuda/integrations/static_cache.py): the Sq (1..16)
  // queries of one step per sample against each (sample, KV head)'s own cached keys. Pairs whose mode is FULL or
  // BLOCK (BLOCK decodes densely) read their whole history from row slot[b, h] of the whole-history pool
  // full_k/v [Pf, L, D]; STREAM pairs read sink + ring-buffer keys from row slot[b, h] of stream_k/v [Ps, Ls, D]
  // (position p lives at p if p < sink, else at sink + (p - sink) % (Ls - sink)). seq_lens int32 [B]: valid tokens
  // of each sample including this step's Sq (the queries are its last Sq positions). q [B, Sq, Hq, D] ->
  // out [B, Sq, Hq, D], lse fp32 [B, Hq, Sq]. num_splits (CUDA): how many equal key chunks the launch
  // spreads the real keys of all pairs over; 0 = one wave of the SMs (csrc/decode/decode_kernel.cuh).
  m.def(
      "decode_attention(Tensor q, Tensor full_k, Tensor full_v, Tensor stream_k, Tensor stream_v, "
      "Tensor head_mode, Tensor slot, Tensor seq_lens, *, int sink, int window, float? scale=None, "
      "int num_splits=0) -> (Tensor out, Tensor lse)");
  // A prefill's keys and values into that cache's pools and tables, in one launch with the routing read on the device:
  // keys/values [B, Hkv, S, D] (transformers' layout, head dims contiguous), head_mode int32 [B, Hkv]. Pair (b, h)
  // gets slot = its rank among the pairs of its kind (STREAM, or FULL/BLOCK: whole history) in (b, h) order; a whole
  // pair's tokens 0..n-1 go to full_k/v[slot, 0..n-1], a STREAM pair's sink tokens and last (stream_k.shape[1] -
  // sink) tokens to their ring rows (as decode_attention reads them). Without padding every sample has n = S
  // tokens; with it, cu_seqlens int32 [B+1] and token_index int64 [T] (flat indices into [B * S] of each sample's
  // valid tokens in order) give them. Writes the tables mode_table (= head_mode), slot (int32 [B, Hkv]), is_whole
  // (bool [B, Hkv]) and seq_lens (int32 [B], n). The pools must hold the routing's pairs (the caller sizes them).
  // CPU kernel and reference: elastic_cuda/_decode_cpu.py.
  m.def(
      "static_cache_commit(Tensor keys, Tensor values, Tensor head_mode, Tensor? cu_seqlens, Tensor? token_index, "
      "Tensor(a!) full_k, Tensor(b!) full_v, Tensor(c!) stream_k, Tensor(d!) stream_v, Tensor(e!) mode_table, "
      "Tensor(f!) slot, Tensor(g!) is_whole, Tensor(h!) seq_lens, *, int sink) -> ()");
  // Router input: mean of the keys of the first n_first and last n_last tokens of each sequence,
  // per KV head, with overlapping tokens counted once. keys [B, S, Hkv, D] (or [T, Hkv, D] with
  // cu_seqlens) -> pooled [B, Hkv, D] in fp32 (fp64 for fp64 keys).
  m.def("boundary_pool(Tensor keys, Tensor? cu_seqlens=None, *, int n_first=100, int n_last=100) -> Tensor");
  // An eval router's whole decision (csrc/router/router_decision.h): the boundary pool of keys (as boundary_pool),
  // optional standardisation ((x - input_mean) / input_std, [Hkv, D]), the router's five Linear layers (mlp: weight,
  // bias of each, SiLU after layers 0, 2, 3), optional head_bias [Hkv, 2], then FULL (0) where
  // logit_full - logit_sparse > shift (shift [B] float32, else shift_value; at shift_value 0 the comparison
  // logit_full > logit_sparse), else sparse_mode. -> head_mode int32 [B, Hkv], logits [B, Hkv, 2] (index 1 = FULL,
  // the mlp's dtype). No autograd (an inference decision). CPU: the eager router's ATen ops (its bits); CUDA: one
  // kernel for fp32 routers (tolerance in router_decision_cuda.cu), else the same ATen ops.
  m.def(
      "router_decision(Tensor keys, Tensor? cu_seqlens, Tensor[] mlp, Tensor? input_mean=None, "
      "Tensor? input_std=None, Tensor? head_bias=None, Tensor? shift=None, *, int n_first=100, int n_last=100, "
      "float shift_value=0.0, int sparse_mode=1) -> (Tensor head_mode, Tensor logits)");
  // Reads the A/B-timing environment switches of the CUDA kernels (csrc/attention/kernel_options.h) again;
  // the extension otherwise reads them once per process. Returns the options now in effect. Tests and
  // benchmarks only.
  m.def("reload_kernel_options() -> str");
  // The options in effect (read from the environment at the first use, like the kernels do), in the format of
  // reload_kernel_options; Python reads the switches it needs (train_mix_fused) from it once.
  m.def("kernel_options() -> str");
}
