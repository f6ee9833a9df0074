"""Tiny randomly initialised models, one per supported architecture family, built from configs."""
from __future__ import annotations

import torch
import transformers as T

V = 128  # vocabulary size of every tiny model

_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, head_dim=8)
_ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=130)

FAMILIES: dict[str, tuple] = {
    "llama": (T.LlamaConfig, _DEC, T.AutoModelForCausalLM),
    "qwen2": (T.Qwen2Config, _DEC, T.AutoModelForCausalLM),
    "qwen3": (T.Qwen3Config, _DEC, T.AutoModelForCausalLM),
    "mistral": (T.MistralConfig, _DEC, T.AutoModelForCausalLM),
    "gemma": (T.GemmaConfig, _DEC, T.AutoModelForCausalLM),
    "gemma2": (T.Gemma2Config, dict(_DEC, sliding_window=8), T.AutoModelForCausalLM),
    "gemma3_text": (T.Gemma3TextConfig, dict(_DEC, sliding_window=8, sliding_window_pattern=2), T.AutoModelForCausalLM),
    "phi3": (T.Phi3Config, dict(_DEC, pad_token_id=0, bos_token_id=1, eos_token_id=2), T.AutoModelForCausalLM),
    "gpt2": (T.GPT2Config, dict(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=256, bos_token_id=0,
                                eos_token_id=0), T.AutoModelForCausalLM),
    "gpt_neox": (T.GPTNeoXConfig, dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, max_position_embeddings=256), T.AutoModelForCausalLM),
    "opt": (T.OPTConfig, dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=32), T.AutoModelForCausalLM),
    "falcon": (T.FalconConfig, dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
               T.AutoModelForCausalLM),
    "falcon_sequential": (T.FalconConfig, dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                               parallel_attn=False, new_decoder_architecture=False), T.AutoModelForCausalLM),
    "bert": (T.BertConfig, _ENC, T.AutoModel),
    "roberta": (T.RobertaConfig, _ENC, T.AutoModel),
    "vit": (T.ViTConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8), T.AutoModel),
}

DECODERS = [k for k, v in FAMILIES.items() if v[2] is T.AutoModelForCausalLM]


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_cls, kwargs, auto = FAMILIES[family]
    torch.manual_seed(seed)
    model = auto.from_config(cfg_cls(**{**kwargs, **overrides}))
    # Random init gives near-identity blocks; larger weights make the statistics non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    return model.eval()


def sample_inputs(family: str, n: int = 4, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
    return torch.randint(3, V, (n, seq), generator=g)


def tiny_tokenizer():
    """Word-level tokenizer over V words (w0..), so any whitespace text of those words tokenizes."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(V - 3)]
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny(family: str, path, seed: int = 0):
    """A tiny model directory (safetensors + config + tokenizer) as users would have on disk."""
    model = build(family, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_text(n_words: int = 3000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 3, (n_words,), generator=g).tolist()
    paras = [" ".join(f"w{i}" for i in ids[s:s + 100]) for s in range(0, n_words, 100)]
    return "\n\n".join(paras)
