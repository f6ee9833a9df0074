"""Exports of plans to other tools (GPTQModel, llm-compressor, HQQ, llama.cpp, mergekit)."""
