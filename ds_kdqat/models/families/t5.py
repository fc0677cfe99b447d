"""T5-style encoders (``model_type`` t5, mt5, umt5), encoder only, as the paper's ULM-Encoder-Large.

Structure (transformers 5.24). ``encoder.block.N`` (``T5Block`` / ``MT5Block`` / ``UMT5Block``) is pre-LN with
RMSNorm (``T5LayerNorm``: no mean, no bias) and no biases anywhere:

* ``layer.0`` (``T5LayerSelfAttention``): ``X + dropout(SelfAttention(layer_norm(X)))``, where ``SelfAttention``
  (``T5Attention`` / ``MT5Attention`` / ``UMT5Attention``: q, k, v, o) calls HF's attention interface with
  ``scaling=1.0`` and its relative ``position_bias`` as a keyword. All three route through the interface in the
  installed transformers (checked on 5.24), so :func:`~ds_kdqat.models.attention.kdqat_attention_forward` adds
  the bias itself. T5/mT5 compute the bias in block 0 only and pass it on; UMT5 has one per block;
* ``layer.1`` (``T5LayerFF``): ``Y + dropout(DenseReluDense(layer_norm(Y)))``; ``DenseReluDense`` is ``wi`` → act →
  ``wo`` (t5, ``feed_forward_proj="relu"``) or gated ``act(wi_0(x)) * wi_1(x)`` → ``wo`` (mT5, UMT5, T5 v1.1,
  ULM: ``gated-gelu``);
* after the last block the stack applies ``final_layer_norm`` and dropout.

What each KD term's tensor is for such a block (the pre-LN counterparts of the post-LN names in DESIGN.md §3):

* **embedding output** ``X_0 = dropout(shared(ids))``: the input of block 0 (HF's ``hidden_states[0]``);
* **attention scores** ``AS = Q·Kᵀ·1.0 + position_bias + mask``: exactly what the softmax sees (T5 folds
  ``1/√d_h`` into the query's initialisation and never scales; the relative bias is part of the score);
  **attention map** its softmax (pre-dropout); **context** ``map·V``. TI-M replaces the map, as for BERT;
* **MHA output**: ``layer.0.SelfAttention.o``'s output, ``Concat(context)·W_O`` (pre-dropout, pre-residual; T5
  has no ``b_O``). TI-O replaces it, so the student's block adds the teacher's MHA output to its own residual;
* **attention output** ``Y_l = X_l + dropout(MHA(RMSNorm(X_l)))``: ``layer.0``'s output, the residual stream
  after the attention sub-layer. It is to pre-LN what ``LayerNorm(X_l + MHA(X_l))`` is to post-LN: the state
  the FFN sub-layer reads (normalised by the FFN's own RMSNorm) and adds to;
* **layer output** ``X_{l+1} = Y_l + dropout(FFN(RMSNorm(Y_l)))``: the block's output (residual stream), for
  ``l < L-1``. The **last** layer output ``X_L`` is taken *after* the encoder's ``final_layer_norm``
  (pre-dropout), i.e. ``RMSNorm_final(Y_{L-1} + FFN(…))``: (1) the raw last residual stream feeds nothing but
  that norm, so the normalised tensor is the whole of what the encoder passes on (to the head); (2) it is a
  normalised tensor like post-LN BERT's ``X_L``, without the large, depth-grown magnitudes of T5's raw residual
  stream that would otherwise dominate the summed layer-output MSE at its last term; (3) it puts the final
  norm's weight under the layer-output loss too; (4) it equals HF's ``hidden_states[-1]`` (= ``last_hidden_state``
  in eval), so all ``L + 1`` layer outputs equal ``output_hidden_states``. Intermediate layer outputs stay raw
  residual streams: each is the input of the next block (which reads it both raw, as its residual, and
  normalised). The adapter's ``final_norm`` tells :mod:`ds_kdqat.models.taps` where ``X_L`` is.

**Task model** (:class:`KdqatT5EncoderForSequenceClassification`, and its mT5 and UMT5 twins): the encoder stack
with the shared embedding, then a head that mean-pools the last hidden state over real tokens (the attention
mask; padding is ignored), then ``dense`` (d→d) → tanh → dropout (``config.classifier_dropout``) → ``out_proj``
(d→num_labels). Mean pooling and no decoder, because the paper's ULM-Encoder-Large is an encoder-only T5 and
T5's encoder has no [CLS] token trained to summarise the input (HF's ``T5ForSequenceClassification`` runs the
decoder to read the EOS state instead). The head's ``dense`` belongs to the head (like RoBERTa's
``classifier.dense``): it is not a ``pooler`` role and the presets leave it in full precision. Loss: MSE for one
label (regression), cross-entropy for class indices, BCE for multi-label (HF's ``problem_type`` rules).
``token_type_ids`` are accepted and ignored (T5 has no segment embedding).

The task model holds one embedding module, ``shared`` (the word embedding role); the stack's own
``embed_tokens`` is removed and the encoder is fed ``shared(ids)``. HF's ``T5EncoderModel`` keeps two modules
sharing one Parameter, which would make the word embedding two quantized modules (or one quantized and one
tied full-precision copy, which the packed export refuses). T5 checkpoints store the embedding as
``shared.weight``, so a ``T5EncoderModel``, ``T5Model`` or ``T5ForConditionalGeneration`` checkpoint loads into
the task model as is (decoder and LM head ignored, new head) and is fine-tuned first (``has_task_head`` is false
for it); a saved task model (``architectures`` names one of the classes below) is recognised by
``has_task_head``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import MT5Config, T5Config, UMT5Config
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.mt5.modeling_mt5 import MT5PreTrainedModel, MT5Stack
from transformers.models.t5.modeling_t5 import T5PreTrainedModel, T5Stack
from transformers.models.umt5.modeling_umt5 import UMT5PreTrainedModel, UMT5Stack

from .base import FamilyAdapter, per_layer, register_family

LAYERS = "encoder.block"
FINAL_NORM = "encoder.final_layer_norm"


# --- the task model -----------------------------------------------------------------------------------------

def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, S, D) over the positions where ``attention_mask`` (B, S) is 1 → (B, D), accumulated
    in float32 (bf16 counts tokens exactly only up to 256); a row without any real token gives zeros."""
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return pooled.to(hidden.dtype)


class MeanPoolClassificationHead(nn.Module):
    """mean over real tokens → dense → tanh → dropout → out_proj."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.activation = nn.Tanh()
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", 0.0) or 0.0)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden, attention_mask)
        return self.out_proj(self.dropout(self.activation(self.dense(pooled))))


def _classification_loss(config: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's ``problem_type`` rules (without writing the inferred type into the config)."""
    num_labels = config.num_labels
    problem_type = config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
        return nn.functional.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class _EncoderClassifier:
    """Shared body of the three task models (mixed in before the family's ``…PreTrainedModel``)."""

    stack_class: type
    _tied_weights_keys = None
    # a seq2seq or encoder checkpoint: its decoder, LM head, the stack's tied copy of the embedding and HF's own
    # classification head are not ours
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\.", r"(^|\.)lm_head\.", r"(^|\.)encoder\.embed_tokens\.",
                                          r"(^|\.)classification_head\."]

    def __init__(self, config: Any):
        super().__init__(config)
        config.is_decoder = False
        config.use_cache = False
        config.is_encoder_decoder = False
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = self.stack_class(config)
        self.encoder.embed_tokens = None  # one embedding module: the encoder is fed shared(ids)
        self.classifier = MeanPoolClassificationHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Module) -> None:
        self.shared = new_embeddings

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, _EncoderClassifier):
            init.normal_(module.shared.weight, mean=0.0, std=factor * 1.0)
        elif isinstance(module, MeanPoolClassificationHead):
            std = factor * self.config.d_model ** -0.5
            for linear in (module.dense, module.out_proj):
                init.normal_(linear.weight, mean=0.0, std=std)
                init.zeros_(linear.bias)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, **kwargs):
        """``input_ids`` (B, S) or ``inputs_embeds`` (B, S, D); ``attention_mask`` (B, S), 1 = token (all ones when
        absent); ``labels`` (B,) class indices or scores; ``token_type_ids`` are ignored. Other keyword arguments
        (``output_hidden_states``, ``output_attentions``) go to the encoder stack."""
        del token_type_ids  # T5 has no segment embedding
        kwargs.pop("return_dict", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        outputs = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(outputs.last_hidden_state, attention_mask)
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class KdqatT5EncoderForSequenceClassification(_EncoderClassifier, T5PreTrainedModel):
    """T5 encoder + mean-pooling classification head (see :mod:`ds_kdqat.models.families.t5`)."""

    config_class = T5Config
    stack_class = T5Stack


class KdqatMT5EncoderForSequenceClassification(_EncoderClassifier, MT5PreTrainedModel):
    """mT5 encoder + mean-pooling classification head."""

    config_class = MT5Config
    stack_class = MT5Stack


class KdqatUMT5EncoderForSequenceClassification(_EncoderClassifier, UMT5PreTrainedModel):
    """UMT5 encoder + mean-pooling classification head."""

    config_class = UMT5Config
    stack_class = UMT5Stack


TASK_MODELS: dict[str, type] = {  # model_type -> task model class
    "t5": KdqatT5EncoderForSequenceClassification,
    "mt5": KdqatMT5EncoderForSequenceClassification,
    "umt5": KdqatUMT5EncoderForSequenceClassification,
}
HEAD_ARCHITECTURES = frozenset(cls.__name__ for cls in TASK_MODELS.values())


def load_encoder_classifier(path: str, num_labels: int, problem_type: Optional[str] = None,
                            local_files_only: bool = False) -> nn.Module:
    """The task model of the checkpoint at ``path`` (eager attention): a saved task model as it is (a new head
    when its number of labels differs), any other T5/mT5/UMT5 checkpoint's encoder with a new head."""
    from transformers import AutoConfig

    kwargs = {"problem_type": problem_type} if problem_type else {}
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local_files_only, **kwargs)
    model_class = TASK_MODELS.get(config.model_type)
    if model_class is None:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not a T5-style encoder ({sorted(TASK_MODELS)})")
    return model_class.from_pretrained(path, config=config, local_files_only=local_files_only,
                                       attn_implementation="eager", ignore_mismatched_sizes=True)


def has_encoder_classification_head(config: Any, num_labels: int) -> bool:
    """The checkpoint is a saved task model of this family with ``num_labels`` outputs."""
    has_head = any(a in HEAD_ARCHITECTURES for a in (config.architectures or []))
    return has_head and config.num_labels == num_labels


@register_family
def t5_family() -> FamilyAdapter:
    attention = r"layer\.0\.SelfAttention\."
    ffn = r"layer\.1\.DenseReluDense\."
    return FamilyAdapter(
        family="t5",
        model_types=("t5", "mt5", "umt5"),
        roles={
            "query": per_layer(LAYERS, attention + "q"),
            "key": per_layer(LAYERS, attention + "k"),
            "value": per_layer(LAYERS, attention + "v"),
            "attention_output_projection": per_layer(LAYERS, attention + "o"),
            "ffn_in": per_layer(LAYERS, ffn + r"(?:wi|wi_0|wi_1)"),
            "ffn_out": per_layer(LAYERS, ffn + "wo"),
            # the task model has only ``shared``; HF's T5EncoderModel also names it encoder.embed_tokens
            "word_embedding": r"(?:shared|encoder\.embed_tokens)",
        },
        attention_classes=("T5Attention", "MT5Attention", "UMT5Attention"),
        layers=LAYERS,
        mha_output="layer.0.SelfAttention.o",
        attention_output="layer.0",
        final_norm=FINAL_NORM,
        input_kind="tokens",
        token_type_ids=False,
        load_task_model=load_encoder_classifier,
        has_task_head=has_encoder_classification_head,
    )


__all__ = ["HEAD_ARCHITECTURES", "KdqatMT5EncoderForSequenceClassification", "KdqatT5EncoderForSequenceClassification",
           "KdqatUMT5EncoderForSequenceClassification", "MeanPoolClassificationHead",
           "TASK_MODELS", "has_encoder_classification_head", "load_encoder_classifier", "masked_mean", "t5_family"]
