"""Loading models, the architecture adapter (family registry + structural fallback) and the skip-compute loader."""
