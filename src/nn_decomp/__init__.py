"""nn_decomp: sparse dictionary learning on language models."""
