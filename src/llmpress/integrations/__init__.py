"""Engines in: llmpress models inside the tools people already run (transformers'
``from_pretrained``, lm-evaluation-harness). Each engine has one module here, imported
only by the code that needs that engine."""
