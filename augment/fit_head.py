"""Fit a masked-LM head (:class:`~augment.mlm_head.MLMHead`) on a frozen encoder from plain sentences.

Because the encoder is frozen, its outputs at masked positions do not change during fitting: we mask each
training sentence ``rounds`` times with BERT's rule (15 % of tokens; 80 % ``[MASK]``, 10 % random, 10 % kept),
run the encoder once per masked batch without gradients, keep the hidden states of the selected positions
(n × H) and their original ids, and then train only the head on those features for ``epochs`` passes with
cross-entropy over the full vocabulary. A held-out share of the sentences, masked once with a fixed
seed, gives the masked-token accuracy before and after.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ds_kdqat.errors import ConfigError

from .mlm_head import MLMHead, mask_tokens


@dataclass
class FitHeadOptions:
    """``rounds``: maskings per training sentence; ``epochs``: passes over the cached features;
    ``max_steps``: stop after this many optimizer steps (null = all epochs); ``batch_size``: masked tokens
    per step; ``encode_batch``: sentences per encoder forward; ``holdout``: share of sentences held out."""

    rounds: int = 1
    epochs: int = 3
    max_steps: Optional[int] = None
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    encode_batch: int = 64
    max_seq_length: int = 128
    holdout: float = 0.1
    mask_rate: float = 0.15
    seed: int = 0

    def validate(self, path: str = "fit_mlm_head") -> None:
        for name in ("rounds", "epochs", "batch_size", "encode_batch", "max_seq_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{path}.{name}", f"got {v!r}; expected an integer >= 1")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ConfigError(f"{path}.max_steps", f"got {self.max_steps!r}; expected an integer >= 1 or null")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"{path}.holdout", f"got {self.holdout!r}; expected a number in (0, 1)")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"{path}.mask_rate", f"got {self.mask_rate!r}; expected a number in (0, 1)")
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr", f"got {self.lr!r}; expected a positive number")


@dataclass
class MaskedFeatures:
    """Encoder outputs at masked positions: ``hidden`` (n, H) float, ``targets`` (n,) long."""

    hidden: torch.Tensor
    targets: torch.Tensor


@torch.inference_mode()
def encode_masked(
    encoder, tokenizer, sentences: Sequence[str], rounds: int, opts: FitHeadOptions, generator: torch.Generator
) -> MaskedFeatures:
    """Mask ``sentences`` ``rounds`` times and collect (hidden, target) at the selected positions."""
    device = next(encoder.parameters()).device
    special = set(tokenizer.all_special_ids)
    random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    hidden, targets = [], []
    for _ in range(rounds):
        for start in range(0, len(sentences), opts.encode_batch):
            batch = tokenizer(
                list(sentences[start : start + opts.encode_batch]),
                truncation=True, max_length=opts.max_seq_length, padding=True, return_tensors="pt",
                return_special_tokens_mask=True,
            )
            ids = batch["input_ids"]
            maskable = (batch["attention_mask"] == 1) & (batch["special_tokens_mask"] == 0)
            masked, selected = mask_tokens(ids, maskable, tokenizer.mask_token_id, random_ids, generator, opts.mask_rate)
            extra = {"token_type_ids": batch["token_type_ids"].to(device)} if "token_type_ids" in batch else {}
            out = encoder(input_ids=masked.to(device), attention_mask=batch["attention_mask"].to(device), **extra)
            hidden.append(out.last_hidden_state[selected.to(device)].float().cpu())
            targets.append(ids[selected])
    return MaskedFeatures(torch.cat(hidden), torch.cat(targets))


@torch.no_grad()
def masked_accuracy(head: MLMHead, word_embeddings: torch.Tensor, feats: MaskedFeatures, batch: int = 1024) -> float:
    """Share of held-out masked positions whose top-1 prediction is the original token."""
    correct = 0
    for s in range(0, len(feats.targets), batch):
        logits = head(feats.hidden[s : s + batch], word_embeddings)
        correct += int((logits.argmax(dim=1) == feats.targets[s : s + batch]).sum())
    return correct / max(1, len(feats.targets))


def fit_mlm_head(
    encoder, tokenizer, sentences: Sequence[str], opts: FitHeadOptions, log: Callable[[str], None] = print
) -> tuple[MLMHead, dict]:
    """Fit a head on the frozen ``encoder``; returns the head (CPU, eval) and figures of the fit."""
    opts.validate()
    sentences = [s for s in sentences if s.strip()]
    if len(sentences) < 10:
        raise ConfigError("fit_mlm_head.input", f"need at least 10 non-empty sentences, got {len(sentences)}")
    order = list(range(len(sentences)))
    random.Random(opts.seed).shuffle(order)
    n_hold = max(1, int(round(len(sentences) * opts.holdout)))
    held = [sentences[i] for i in order[:n_hold]]
    train = [sentences[i] for i in order[n_hold:]]
    torch.manual_seed(opts.seed)
    encoder = encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    emb = encoder.get_input_embeddings().weight.detach().float().cpu()
    config = encoder.config
    head = MLMHead(config.hidden_size, emb.shape[0], config.layer_norm_eps, getattr(config, "hidden_act", "gelu"))

    gen = torch.Generator().manual_seed(opts.seed)
    log(f"encoding {len(train)} training sentences x {opts.rounds} maskings, {len(held)} held out")
    train_feats = encode_masked(encoder, tokenizer, train, opts.rounds, opts, gen)
    held_feats = encode_masked(encoder, tokenizer, held, 1, opts, torch.Generator().manual_seed(opts.seed + 1))
    before = masked_accuracy(head, emb, held_feats)
    log(f"held-out masked-token accuracy before: {before:.4f} ({len(held_feats.targets)} tokens)")

    optim = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    n = len(train_feats.targets)
    steps_per_epoch = math.ceil(n / opts.batch_size)
    total = steps_per_epoch * opts.epochs if opts.max_steps is None else min(opts.max_steps, steps_per_epoch * opts.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: max(0.0, 1.0 - s / max(1, total)))
    step, last_loss = 0, float("nan")
    head.train()
    for epoch in range(opts.epochs):
        perm = torch.randperm(n, generator=gen)
        running, count = 0.0, 0
        for s in range(0, n, opts.batch_size):
            if step >= total:
                break
            idx = perm[s : s + opts.batch_size]
            loss = F.cross_entropy(head(train_feats.hidden[idx], emb), train_feats.targets[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            running += loss.item() * len(idx)
            count += len(idx)
        if count:
            last_loss = running / count
            log(f"epoch {epoch + 1}: train loss {last_loss:.4f} ({step} steps)")
        if step >= total:
            break
    head.eval()
    after = masked_accuracy(head, emb, held_feats)
    log(f"held-out masked-token accuracy after: {after:.4f}")
    stats = {
        "train_sentences": len(train),
        "heldout_sentences": len(held),
        "train_masked_tokens": n,
        "heldout_masked_tokens": len(held_feats.targets),
        "steps": step,
        "final_train_loss": last_loss,
        "heldout_accuracy_before": before,
        "heldout_accuracy_after": after,
        "options": dict(opts.__dict__),
    }
    return head, stats
