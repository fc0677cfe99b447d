"""BERT, RoBERTa and ELECTRA: one family (the same module names under ``encoder.layer.N``).

Post-LN layers (``BertLayer``): ``attention.self`` (``XxxSelfAttention``: query, key, value; calls the attention
interface) → ``attention.output`` (``XxxSelfOutput``: dense = W_O → dropout → ``LayerNorm(· + X_l)``) →
``intermediate.dense`` (FFN in, GELU) → ``output`` (dense = FFN out → dropout → ``LayerNorm(· + Y_l)``). So:

* attention scores / maps: ``Q·Kᵀ/√d_h + mask`` and its softmax, from the attention function;
* MHA output: ``attention.output.dense``'s output (pre-dropout, pre-residual);
* attention output ``Y_l = LayerNorm(X_l + MHA(X_l))``: ``attention.output``'s output;
* layer output ``X_{l+1} = LayerNorm(Y_l + FFN(Y_l))``: the layer's output; ``X_0`` is the embedding output
  (ELECTRA: after ``embeddings_project`` when ``embedding_size != hidden_size``, as HF's ``hidden_states[0]``).

Task model: ``AutoModelForSequenceClassification``. BERT's has a pooler (``pooler.dense`` on [CLS]); RoBERTa's
and ELECTRA's classification models have none (their head's dense is the classifier's, not a role).
Extractive QA: ``AutoModelForQuestionAnswering`` (``qa_outputs``: start/end logits per token).
"""

from .base import FamilyAdapter, has_question_answering_head, load_question_answering, per_layer, register_family

LAYERS = "encoder.layer"


@register_family
def bert_family() -> FamilyAdapter:
    return FamilyAdapter(
        family="bert",
        model_types=("bert", "roberta", "electra"),
        roles={
            "query": per_layer(LAYERS, r"attention\.self\.query"),
            "key": per_layer(LAYERS, r"attention\.self\.key"),
            "value": per_layer(LAYERS, r"attention\.self\.value"),
            "attention_output_projection": per_layer(LAYERS, r"attention\.output\.dense"),
            "ffn_in": per_layer(LAYERS, r"intermediate\.dense"),
            "ffn_out": per_layer(LAYERS, r"output\.dense"),
            "word_embedding": r"embeddings\.word_embeddings",
            "pooler": r"pooler\.dense",
        },
        attention_classes=("BertSelfAttention", "RobertaSelfAttention", "ElectraSelfAttention"),
        layers=LAYERS,
        mha_output="attention.output.dense",
        attention_output="attention.output",
        input_kind="tokens",
        token_type_ids=True,
        load_qa_model=load_question_answering,
        has_qa_head=has_question_answering_head,
    )
