"""Torch/transformers model surgery for GlimpsePrune. Never imports ray."""
