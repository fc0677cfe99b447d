"""ViT (``model_type`` vit): partial — attention routing and quantization roles only.

Pre-LN ``ViTLayer`` under ``layers.N`` (transformers 5.x; older 5.x releases named it
``encoder.layer.N.attention.attention.query`` …, which the role regexes also accept): ``X_l + MHA(LN_before(X_l))``
then ``· + MLP(LN_after(·))``, where ``attention`` (``ViTAttention``: q_proj, k_proj, v_proj and o_proj = W_O)
calls the attention interface. The pre-LN counterparts of the post-LN names: MHA output = ``attention.o_proj``'s
output; attention output ``Y_l = X_l + MHA(LN(X_l))`` is the *input* of ``layernorm_after`` (no module outputs
it); layer output ``X_{l+1} = Y_l + MLP(LN(Y_l))``. Inputs are pixels, which :func:`~ds_kdqat.models.taps.
forward_with_taps` does not take yet, so taps, KD and the pipeline are not available for ViT: presets quantize
its linears (it has no word embedding) and its attention runs through the kdqat function.
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
        attention_output="layernorm_after",  # its input, not its output, is Y_l (see the module docstring)
        input_kind="pixels",
        token_type_ids=False,
        load_task_model=load_image_classifier,
        has_task_head=has_image_classification_head,
        status="partial",
        note="pixels input: quantization and attention routing only (no taps, KD or pipeline yet)",
    )

