"""Configuration of a layer-parallel checkpoint written by lpconvert.

This file is copied, unchanged, into every exported checkpoint. It imports only transformers, and
every model-specific value lives in config.json, never in this code.

`num_hidden_layers` counts the *blocks* the model runs (its effective depth). `lp_blocks` says
which source layers each block holds: `[5]` is a copied layer, `[6, 7]` a layer-parallel pair run
as one wide layer (2x heads, 2x KV heads, 2x MLP width, norm weights folded into the projections).
Head counts and `intermediate_size` are those of ONE source layer; a block of h layers has h times
as many.
"""

from transformers import PretrainedConfig


class LPConfig(PretrainedConfig):
    model_type = "lpconvert"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        rope_parameters=None,
        attention_bias=False,
        attention_out_bias=False,
        mlp_bias=False,
        qk_norm=False,
        attention_dropout=0.0,
        sliding_window=None,
        layer_types=None,
        lp_blocks=None,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias  # biases on q/k/v
        self.attention_out_bias = attention_out_bias  # bias on o_proj
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm  # per-head RMSNorm on q and k (Qwen3)
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.lp_blocks = lp_blocks or [[i] for i in range(num_hidden_layers)]
        self.num_hidden_layers = len(self.lp_blocks)
        self.layer_types = layer_types or ["full_attention"] * self.num_hidden_layers
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


__all__ = ["LPConfig"]
