"""How much host RAM and VRAM a llama.cpp load of a GGUF will take (pure, no I/O).

The figure is the one the device experiences: the worker process's peak resident set
while it serves prompts, i.e. what a memory budget (RAM + cgroup limit) is charged.
Calibrated against measurement (tests/catalog/test_estimate.py and test_gemma.py,
scripts/bench_estimator.py) with llama-cpp-python 0.3.36 on x86_64, on two architectures
(llama: SmolLM2-135M; gemma3: Gemma 3 270M, tied embeddings, 262k vocabulary, sliding
windows); the parts are:

- process: an idle worker interpreter with llama_cpp imported (measured 47 MiB).
- weights: with mmap llama.cpp populates the whole mapping on load, so every page of
  the file is resident (file-backed, but needed: evicting it means thrashing); a split
  model maps each of its parts, so ``file_size`` is theirs together and the GGUFInfo holds
  every part's tensors (agent.catalog.gguf.merge_split). Tensors
  that the CPU backend repacks for its SIMD kernels (Q4_0/Q4_K/IQ4_NL on AVX2, Q2_K on
  AVX-512, most 4-8 bit types on ARM dotprod/i8mm) are copied into anonymous memory on
  top of their still-resident file pages. Offloaded layers go to VRAM instead.
- KV cache: n_ctx (padded to 256) x (K + V head dims x KV heads) x type size per layer;
  llama.cpp clears the buffer on creation, so all of it is resident from the start. Layers
  with sliding-window attention (gemma3: 5 of every 6) get the same n_ctx cells, not the
  window: llama.cpp's ``swa_full`` default, which llama-cpp-python and the worker keep (the
  prompt-prefix reuse between requests rewinds the cache, which a window-sized one cannot).
- compute: llama.cpp reserves a worst-case graph buffer (the logits tensor, vocab x
  n_ubatch x 4 bytes, dominates it for small models) but a prompt only writes the
  logits row it samples from, so what becomes resident is the per-ubatch activations
  (FFN and attention intermediates), the attention mask at full context, and, without
  flash attention, the n_ctx x n_ubatch x n_head score matrices.
- overhead: vocabulary tables, the output buffer, thread pools, Python-side objects.

It does not decide what fits (agent.catalog.select does) and never reads files.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.catalog.gguf import GGUFInfo, TensorInfo
from agent.catalog.selection import KVType, MemoryEstimate

MiB = 1024 * 1024

# Measured: RSS of `python -c "import llama_cpp; llama_cpp.llama_backend_init()"`.
WORKER_PROCESS_BYTES = 47 * MiB
# Measured: anonymous memory a load adds beyond KV, repack and compute (SmolLM2-135M,
# 49k vocabulary: 19-20 MiB; Gemma 3 270M, 262k vocabulary: 5 MiB more than 80 bytes a token
# gave), with a per-token share for bigger vocabularies.
RUNTIME_OVERHEAD_BYTES = 16 * MiB
OVERHEAD_PER_VOCAB_TOKEN = 100
# CUDA/Metal context, cuBLAS workspace: not measurable here; a conservative constant
# that the learned correction replaces after the first real load.
GPU_CONTEXT_BYTES = 300 * MiB
KV_CTX_PADDING = 256  # llama.cpp pads n_ctx to a multiple of this

# Bytes per element of the KV cache types (q8_0 / q4_0 store 32 elements per block).
KV_TYPE_BYTES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# ggml-cpu/repack.cpp (llama.cpp in llama-cpp-python 0.3.36): which tensor types the CPU
# backend repacks, by the ISA it was built for, and the row-count multiple it needs.
_REPACK_X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
_REPACK_X86_AVX512 = {**_REPACK_X86_AVX2, "Q2_K": 8}
_REPACK_ARM_DOTPROD = {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4}


def repack_rules(arch: str, cpu_flags: Iterable[str]) -> dict[str, int]:
    """Tensor types the CPU backend repacks on this device -> required row multiple."""
    flags = {f.lower() for f in cpu_flags}
    if arch in ("x86_64", "amd64"):
        if "avx512f" in flags or "avx512" in flags:
            return dict(_REPACK_X86_AVX512)
        if "avx2" in flags:
            return dict(_REPACK_X86_AVX2)
        return {}
    if arch in ("aarch64", "arm64") and ("dotprod" in flags or "asimddp" in flags or "i8mm" in flags):
        return dict(_REPACK_ARM_DOTPROD)
    return {}


def _is_matmul_weight(tensor: TensorInfo) -> bool:
    # token_embd is read with get_rows (never repacked, even when tied to the output).
    return len(tensor.shape) == 2 and tensor.name.endswith(".weight") and tensor.name != "token_embd.weight"


def repacked_bytes(tensors: Iterable[TensorInfo], rules: dict[str, int]) -> int:
    return sum(
        t.nbytes
        for t in tensors
        if _is_matmul_weight(t) and t.type_name in rules and t.shape[1] % rules[t.type_name] == 0
    )


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, kv_type: KVType, n_layers: int | None = None) -> int:
    """KV cache for ``n_layers`` blocks (all by default) at ``n_ctx`` cells."""
    cells = -(-n_ctx // KV_CTX_PADDING) * KV_CTX_PADDING
    per_cell = info.head_count_kv * (info.key_length + info.value_length) * KV_TYPE_BYTES[kv_type]
    layers = info.block_count if n_layers is None else n_layers
    return int(cells * per_cell * layers)


def compute_bytes(info: GGUFInfo, n_ctx: int, n_ubatch: int, flash_attn: bool) -> int:
    """Resident compute memory at the worst point: a full ubatch at a full context."""
    cells = -(-n_ctx // KV_CTX_PADDING) * KV_CTX_PADDING
    n_ff = info.feed_forward_length or 4 * info.embedding_length
    # Live per token in a block, in f32: FFN gate, up and product (n_ff each), the residual
    # stream and the norm output (n_embd each), and the attention's Q, K, V and output at their
    # own widths (heads x head dims: wider than n_embd on gemma3, 4 x 256 for 640).
    attention = (info.head_count + info.head_count_kv) * (info.key_length + info.value_length)
    activations = n_ubatch * 4 * (3 * n_ff + 2 * info.embedding_length + attention)
    logits_row = info.vocab_size * 4
    if flash_attn:
        mask = cells * n_ubatch * 2  # f16 mask, n_kv x n_tokens
        return activations + mask + logits_row
    mask = cells * n_ubatch * 4
    # Scores and their softmax, n_kv x n_tokens x n_head in f32, both live at once.
    scores = 2 * cells * n_ubatch * info.head_count * 4
    return activations + mask + scores + logits_row


def _place_tensors(info: GGUFInfo, n_gpu_layers: int) -> tuple[list[TensorInfo], int]:
    """The tensors that stay on the host, and the bytes of those offloaded to the GPU: the
    first ``n_gpu_layers`` blocks, and the output too when every block is offloaded."""
    gpu_layers = max(0, min(n_gpu_layers, info.block_count))
    output_on_gpu = n_gpu_layers > info.block_count
    offloaded = {t.name for t in info.tensors if t.layer is not None and t.layer < gpu_layers}
    if output_on_gpu:
        offloaded |= {t.name for t in info.tensors
                      if t.layer is None and t.name != "token_embd.weight"}
    host_tensors = [t for t in info.tensors if t.name not in offloaded]
    gpu_tensor_bytes = sum(t.nbytes for t in info.tensors if t.name in offloaded)
    if output_on_gpu and not any(t.name == "output.weight" for t in info.tensors):
        # Tied embeddings: llama.cpp gives the GPU its own copy of token_embd as the output.
        gpu_tensor_bytes += sum(t.nbytes for t in info.tensors if t.name == "token_embd.weight")
    return host_tensors, gpu_tensor_bytes


def estimate_memory(
    info: GGUFInfo,
    file_size: int,
    *,
    n_ctx: int,
    n_batch: int = 512,
    n_ubatch: int = 512,
    kv_type: KVType = "f16",
    n_gpu_layers: int = 0,
    flash_attn: bool = True,
    use_mmap: bool = True,
    repack: dict[str, int] | None = None,
    learned_ram_bytes: int | None = None,
) -> MemoryEstimate:
    """RAM and VRAM a load with these settings will need.

    ``repack`` is repack_rules() for the device (None: no repacking, e.g. a GPU-only
    build). ``learned_ram_bytes`` (a measured figure for the same key) is carried along
    so the caller can prefer it while still showing the raw estimate.
    """
    n_ubatch = min(n_ubatch, n_batch)
    gpu_layers = max(0, min(n_gpu_layers, info.block_count))
    host_tensors, gpu_tensor_bytes = _place_tensors(info, n_gpu_layers)
    if use_mmap:
        # The whole mapping is populated; offloaded tensors' pages are dropped after upload.
        host_weights = file_size - gpu_tensor_bytes if gpu_layers else file_size
    else:
        host_weights = sum(t.nbytes for t in host_tensors)
    host_weights += repacked_bytes(host_tensors, repack or {})

    kv_host = kv_cache_bytes(info, n_ctx, kv_type, info.block_count - gpu_layers)
    kv_gpu = kv_cache_bytes(info, n_ctx, kv_type, gpu_layers)
    compute = compute_bytes(info, n_ctx, n_ubatch, flash_attn)
    overhead = RUNTIME_OVERHEAD_BYTES + info.vocab_size * OVERHEAD_PER_VOCAB_TOKEN

    vram = 0
    if gpu_layers:
        # A GPU backend commits its whole reserved graph buffer, logits included.
        gpu_compute = compute + info.vocab_size * n_ubatch * 4
        vram = gpu_tensor_bytes + kv_gpu + gpu_compute + GPU_CONTEXT_BYTES
    ram = WORKER_PROCESS_BYTES + host_weights + kv_host + compute + overhead
    return MemoryEstimate(
        ram_bytes=int(ram),
        vram_bytes=int(vram),
        weights_bytes=int(host_weights),
        kv_bytes=int(kv_host + kv_gpu),
        compute_bytes=int(compute),
        overhead_bytes=int(overhead),
        process_bytes=WORKER_PROCESS_BYTES,
        learned_ram_bytes=learned_ram_bytes,
    )
