"""Lossless checkpoint compression: byte-exact ``pack``/``unpack`` of safetensors checkpoints.

planes.py (field split per dtype) → entropy.py (coding backends) → chunk.py (one chunk) →
segments.py (cut a file) → reader.py (the ``.llmp`` format) → container.py (the verbs;
fanout.py: ``pack`` on Ray, one task per file);
kernels.py holds the compiled inner loops (rANS, bit packing, field split; numba, GIL-free);
bounds.py gives the entropy bounds that ``llmpress info`` reports.
"""
