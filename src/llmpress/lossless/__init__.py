"""Lossless checkpoint compression: byte-exact ``pack``/``unpack`` of safetensors checkpoints,
GGUF files and quantized folders.

fields.py (field split per dtype) → entropy.py (coding backends) → chunk.py (one chunk) →
segments.py (cut a file) → reader.py (the ``.llmp`` format) → container.py (the verbs;
fanout.py: ``pack`` on Ray, one task per file);
kernels.py holds the compiled inner loops (the four-lane rANS, bit packing, field split; numba,
GIL-free), rans32.py the 32-lane rANS, freq_model.py the rANS model's bytes, chunk_kernel.py a
float chunk's decoding in one compiled call; docs/FORMAT.md specifies the bytes;
bounds.py gives the entropy bounds that ``llmpress info`` reports; grid.py finds float tensors on
a block grid (grid_kernel.py); gguf.py splits a GGUF file's ggml blocks into fields (gguf_kernel.py
merges them back); quantized.py finds a quantized folder's packed codes and zeros.py their zero
points; delta.py codes a fine-tune's tensors against a base model (base.py reads it;
delta_kernel.py holds the compiled loops).
"""
