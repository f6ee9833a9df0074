"""Merging fine-tuned models by layer: merge methods (`methods/`), layer schemes (`layers/`), the action (`apply`)."""
