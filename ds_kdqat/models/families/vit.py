"""ViT (``model_type`` vit): image classification through the same taps, KD terms, interventions and pipeline.

Pre-LN ``ViTLayer`` under ``layers.N`` (transformers 5.x; older 5.x releases named the modules
``encoder.layer.N.attention.attention.query`` …, which the role regexes also accept)::

    Y_l     = X_l + dropout(MHA(layernorm_before(X_l)))      MHA = attention (ViTAttention: q/k/v/o_proj)
    X_{l+1} = Y_l + dropout(MLP(layernorm_after(Y_l)))        MLP = mlp.fc1 → GELU → mlp.fc2

The pre-LN counterparts of the post-LN names (:mod:`ds_kdqat.models.taps`), so that every KD term and both
interventions mean something for ViT:

* attention score / map / context: ``Q·Kᵀ/√d_h`` (no mask: every patch and [CLS] is a real token), its
  softmax, ``map·V``, from the attention function; Q, K, V are projections of ``layernorm_before(X_l)``;
* MHA output: ``attention.o_proj``'s output (pre-dropout, pre-residual) — TI-O replaces it, so the student's
  ``Y_l = X_l + teacher MHA``;
* attention output ``Y_l = X_l + MHA(LN(X_l))``: the residual stream between the two sub-layers, i.e. the
  **input** of ``layernorm_after`` (no module outputs it; ``attention_output_at="input"``). It is not
  normalised, unlike BERT's ``Y_l``: the "output" loss is an MSE on the residual stream;
* layer output ``X_{l+1} = Y_l + MLP(LN(Y_l))``: the layer's output (also un-normalised), except the last,
  ``X_L = vit.layernorm(Y_{L-1} + MLP(…))``: the output of the final LayerNorm, by the rule every pre-LN
  family follows (``FamilyAdapter.final_norm``; T5 does the same with ``final_layer_norm``). ``X_0`` is the
  embedding output ([CLS] + patch embeddings + positions), the input of layer 0. So ``X_0 … X_{L-1}`` are
  HF's ``hidden_states[:-1]`` and ``X_L`` is HF's ``last_hidden_state``.

Inputs: ``pixel_values`` (B, C, H, W) at the config's ``image_size`` and ``num_channels`` (input kind
``"pixels"``); the sequence is ``(image_size / patch_size)² + 1`` tokens, none of them padding.

Roles: query, key, value (``attention.q_proj`` …), attention_output_projection (``attention.o_proj``), ffn_in
(``mlp.fc1``), ffn_out (``mlp.fc2``); there is no word embedding and the classification model has no pooler.
The patch embedding (``embeddings.patch_embeddings.projection``, a Conv2d) is **not quantized** by any preset:
it is no role, as the position/segment embeddings of text models are not (a ``patterns`` group cannot
quantize it either: ds-kdqat's quantized modules are Linear and Embedding). Nor are the [CLS] token, the
position embeddings, the LayerNorms and the classifier.

Task model: ``ViTForImageClassification`` (classifier on the final-LayerNorm [CLS] state), eager attention, then
routed through the kdqat attention function.
"""

from .base import FamilyAdapter, has_image_classification_head, load_image_classifier, register_family

LAYERS = "layers"
_LAYER = r"(?:layers|encoder\.layer)\.\d+\."


@register_family
def vit_family() -> FamilyAdapter:
    return FamilyAdapter(
        family="vit",
        model_types=("vit",),
        roles={
            "query": _LAYER + r"attention\.(?:q_proj|attention\.query)",
            "key": _LAYER + r"attention\.(?:k_proj|attention\.key)",
            "value": _LAYER + r"attention\.(?:v_proj|attention\.value)",
            "attention_output_projection": _LAYER + r"attention\.(?:o_proj|output\.dense)",
            "ffn_in": _LAYER + r"(?:mlp\.fc1|intermediate\.dense)",
            "ffn_out": _LAYER + r"(?:mlp\.fc2|output\.dense)",
            "pooler": r"pooler\.dense",
        },
        attention_classes=("ViTAttention", "ViTSelfAttention"),
        layers=LAYERS,
        mha_output="attention.o_proj",
        attention_output="layernorm_after",
        attention_output_at="input",  # Y_l = X_l + MHA(LN(X_l)) is what layernorm_after normalises
        final_norm="layernorm",  # X_L after the final LayerNorm, as for every pre-LN family
        input_kind="pixels",
        token_type_ids=False,
        load_task_model=load_image_classifier,
        has_task_head=has_image_classification_head,
    )
