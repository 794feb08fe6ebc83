"""On-disk helpers: atomic outputs, checksums, safetensors streaming."""
