"""Config of a drprune compact model whose layers differ in shape (shipped as HF remote code).

`drprune convert composer-to-hf` copies this file beside config.json; it depends only on transformers.
Standard HF names are used where one exists; `layers` holds one dict per layer: n_heads, n_kv_heads,
intermediate_size (0 = sub-layer removed) and the residual dimensions each sub-layer reads / writes
(attn_in, attn_out, mlp_in, mlp_out; null = all of them).
"""
from transformers import PretrainedConfig


class DrpruneConfig(PretrainedConfig):
    model_type = "drprune"

    def __init__(
        self,
        family="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_size=11008,
        max_position_embeddings=4096,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="gated",
        activation="silu",
        parallel_residual=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        rotary_pct=1.0,
        rope_theta=10000.0,
        rope_scaling=None,
        layers=None,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm = norm
        self.norm_eps = norm_eps
        self.mlp = mlp
        self.activation = activation
        self.parallel_residual = parallel_residual
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.rotary_pct = rotary_pct
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.layers = layers
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer(self, i):
        """Shape of layer i as a dict (every layer alike when `layers` is null)."""
        if self.layers is not None:
            return self.layers[i]
        return {"n_heads": self.num_attention_heads, "n_kv_heads": self.num_key_value_heads,
                "intermediate_size": self.intermediate_size}
