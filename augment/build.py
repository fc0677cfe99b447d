"""Build an :class:`~augment.augmenter.Augmenter` from an :class:`~augment.config.AugmentConfig`."""

from __future__ import annotations

from .augmenter import Augmenter, AugmentParams
from .config import AugmentConfig
from .glove import GloveNeighbours, load_glove
from .int8 import check_int8_dynamic, quantize_encoder
from .mlm import load_masked_lm, packaged_minilm_path, resolve_device
from .stopwords import load_stopwords
from .words import WordSplitter


def augment_params(cfg: AugmentConfig) -> AugmentParams:
    return AugmentParams(
        num_candidates=cfg.num_candidates,
        replace_prob=float(cfg.replace_prob),
        num_new=cfg.resolved_num_new(),
        candidate_source=cfg.candidate_source,
        mlm_input=cfg.mlm.input,
        batch_size=cfg.mlm.batch_size,
        max_seq_length=cfg.mlm.max_seq_length,
    )


def build_augmenter(cfg: AugmentConfig) -> Augmenter:
    """Load what ``cfg`` asks for: the masked LM (unless GloVe-only; its encoder in ``cfg.mlm.precision``), its
    tokenizer, GloVe (unless MLM-only)."""
    masked_lm = None
    if cfg.candidate_source != "glove":
        if cfg.mlm.precision == "int8_dynamic":
            check_int8_dynamic(resolve_device(cfg.mlm.device))  # before the model loads
        masked_lm = load_masked_lm(cfg.mlm.model, cfg.mlm.head, cfg.mlm.device)
        if cfg.mlm.precision == "int8_dynamic":
            quantize_encoder(masked_lm)
        tokenizer = masked_lm.tokenizer
        device = masked_lm.device
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.mlm.model or packaged_minilm_path())
        device = resolve_device(cfg.mlm.device)
    glove = None
    if cfg.candidate_source != "mlm":
        vectors = load_glove(cfg.glove.path, cfg.glove.format, cfg.glove.vocab_size)
        glove = GloveNeighbours(vectors, cfg.num_candidates, device=str(device))
    return Augmenter(WordSplitter(tokenizer), load_stopwords(cfg.stopwords), augment_params(cfg), glove, masked_lm)
