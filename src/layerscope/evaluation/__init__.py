"""Re-measuring a model: perplexity, embedding fidelity, removal and quantization sweeps."""
