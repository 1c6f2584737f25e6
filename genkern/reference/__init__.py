"""Plain-PyTorch versions of every hot path: the spec, the fallback and the baseline."""
