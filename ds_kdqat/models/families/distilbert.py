"""DistilBERT (``model_type`` distilbert).

Post-LN ``TransformerBlock`` under ``transformer.layer.N``: ``attention`` (``DistilBertSelfAttention``: q_lin,
k_lin, v_lin; calls the attention interface; then out_lin = W_O) → ``sa_layer_norm(· + X_l)`` → ``ffn``
(lin1 = FFN in, GELU, lin2 = FFN out, dropout) → ``output_layer_norm(· + Y_l)``. So:

* attention scores / maps: ``Q·Kᵀ/√d_h + mask`` and its softmax, from the attention function;
* MHA output: ``attention.out_lin``'s output (pre-dropout, pre-residual);
* attention output ``Y_l = LayerNorm(X_l + MHA(X_l))``: ``sa_layer_norm``'s output;
* layer output ``X_{l+1} = LayerNorm(Y_l + FFN(Y_l))``: the block's output; ``X_0`` the embedding output.

No token type ids (the forward does not take them) and no pooler: the classification head's ``pre_classifier``
belongs to the head, as RoBERTa's ``classifier.dense`` does, and is not quantized by the presets.
"""

from .base import FamilyAdapter, per_layer, register_family

LAYERS = "transformer.layer"


@register_family
def distilbert_family() -> FamilyAdapter:
    return FamilyAdapter(
        family="distilbert",
        model_types=("distilbert",),
        roles={
            "query": per_layer(LAYERS, r"attention\.q_lin"),
            "key": per_layer(LAYERS, r"attention\.k_lin"),
            "value": per_layer(LAYERS, r"attention\.v_lin"),
            "attention_output_projection": per_layer(LAYERS, r"attention\.out_lin"),
            "ffn_in": per_layer(LAYERS, r"ffn\.lin1"),
            "ffn_out": per_layer(LAYERS, r"ffn\.lin2"),
            "word_embedding": r"embeddings\.word_embeddings",
        },
        attention_classes=("DistilBertSelfAttention", "MultiHeadSelfAttention"),
        layers=LAYERS,
        mha_output="attention.out_lin",
        attention_output="sa_layer_norm",
        input_kind="tokens",
        token_type_ids=False,
    )
