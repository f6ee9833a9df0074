"""The block-sequential engine: the one executor that runs blocks, its taps, and in-memory removal."""
