"""Fit a masked-LM head (:class:`~augment.mlm_head.MLMHead`) on an encoder from plain sentences, optionally
together with the encoder's top ``K`` layers.

Sentences are split once into a training share and a held-out share (``holdout``). Training sentences are
masked ``rounds`` times with BERT's rule (:func:`~augment.mlm_head.mask_tokens`: 15 % of tokens; 80 %
``[MASK]``, 10 % random, 10 % kept); the loss is the cross-entropy over the full vocabulary at the selected
positions.

* ``unfreeze_layers = 0`` (frozen encoder): the encoder's outputs at masked positions never change, so each
  masked batch is encoded once without gradients, the selected positions' hidden states (n × H) and original
  ids are kept, and only the head is trained on them for ``epochs`` passes (shuffled tokens, ``batch_size``
  tokens a step).
* ``unfreeze_layers = K > 0``: the lower ``L − K`` layers stay frozen, so their output (the input of layer
  ``L − K``, (B, T, H) per batch) is computed once per masking round and cached; each step then runs only the
  top ``K`` layers and the head, with gradients, on one cached batch of ``sentence_batch`` sentences (the
  tuned layers in training mode, i.e. with their dropout). Head and layers have their own learning rates
  (``lr``, ``encoder_lr``); AdamW with ``weight_decay`` on weight matrices only, linear warm-up over
  ``warmup`` of the steps, then linear decay to 0. The tuned layers are changed in place in the encoder and
  copied to the returned head's :attr:`~augment.mlm_head.MLMHead.encoder_tensors`, so saving the head saves
  them.

Figures, before and after fitting, on the held-out sentences masked once with a fixed seed: the share of
masked positions whose original token is the top-1 prediction and among the top ``num_candidates``
(:func:`topk_accuracy`). After fitting, the figure augmentation depends on (:func:`candidate_recall`): for
eligible single-piece held-out words (not stop words), masked one at a time exactly as the augmenter queries
them (``eval_input``, ``pair`` by default), the share whose original word is among the ``num_candidates``
allowed candidates; capped at ``eval_words`` words.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.errors import ConfigError

from .mlm_head import MLMHead, mask_tokens

MLM_INPUTS = ("pair", "masked_only")


@dataclass
class FitHeadOptions:
    """Options of :func:`fit_mlm_head`.

    ``unfreeze_layers``: top encoder layers trained with the head (0 = frozen encoder, head only);
    ``rounds``: maskings per training sentence; ``epochs``: passes over all rounds' masked batches;
    ``max_steps``: stop after this many optimizer steps (null = all epochs); ``lr``: the head's learning rate;
    ``encoder_lr``: the tuned layers'; ``warmup``: share of the steps with a linear warm-up;
    ``batch_size``: masked tokens per step with a frozen encoder; ``sentence_batch``: sentences per step with
    tuned layers; ``encode_batch``: sentences per no-gradient encoder forward; ``holdout``: share of sentences
    held out; ``num_candidates``: the M of top-M accuracy and of the candidate check; ``eval_words``: cap on the
    held-out words of the candidate check (0 = skip it); ``eval_input``: its masked-LM input (``pair`` or
    ``masked_only``, as ``augment.mlm.input``).
    """

    unfreeze_layers: int = 3
    rounds: int = 6
    epochs: int = 2
    max_steps: Optional[int] = None
    lr: float = 3e-3
    encoder_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    batch_size: int = 256
    sentence_batch: int = 32
    encode_batch: int = 64
    max_seq_length: int = 128
    holdout: float = 0.1
    mask_rate: float = 0.15
    num_candidates: int = 15
    eval_words: int = 2000
    eval_input: str = "pair"
    seed: int = 0

    def validate(self, path: str = "fit_mlm_head") -> None:
        for name in ("rounds", "epochs", "batch_size", "sentence_batch", "encode_batch", "max_seq_length",
                     "num_candidates"):
            _check_int(getattr(self, name), f"{path}.{name}", 1)
        _check_int(self.unfreeze_layers, f"{path}.unfreeze_layers", 0)
        _check_int(self.eval_words, f"{path}.eval_words", 0)
        if self.max_steps is not None:
            _check_int(self.max_steps, f"{path}.max_steps", 1, "or null")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"{path}.holdout", f"got {self.holdout!r}; expected a number in (0, 1)")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"{path}.mask_rate", f"got {self.mask_rate!r}; expected a number in (0, 1)")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{path}.warmup", f"got {self.warmup!r}; expected a number in [0, 1)")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)!r}; expected a positive number")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{path}.weight_decay", f"got {self.weight_decay!r}; expected a number >= 0")
        if self.eval_input not in MLM_INPUTS:
            raise ConfigError(f"{path}.eval_input", f"got {self.eval_input!r}; allowed: {', '.join(MLM_INPUTS)}")


def _check_int(value, key: str, low: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"got {value!r}; expected an integer >= {low}{' ' + extra if extra else ''}")


# --- masking -----------------------------------------------------------------------------------------------


@dataclass
class MaskedBatch:
    """One tokenised batch after masking: ``input_ids`` (B, T) masked ids, ``attention_mask`` (B, T),
    ``token_type_ids`` (B, T) or None, ``selected`` (B, T) bool, ``targets`` (n,) = original ids at
    ``selected`` (row-major order)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: Optional[torch.Tensor]
    selected: torch.Tensor
    targets: torch.Tensor

    def encoder_kwargs(self, device: torch.device) -> dict:
        extra = {"token_type_ids": self.token_type_ids.to(device)} if self.token_type_ids is not None else {}
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device), **extra}


def random_token_ids(tokenizer) -> torch.Tensor:
    """(V',) ids a selected token may be replaced by: every id of the tokenizer but its special ones."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def masked_batches(
    tokenizer, sentences: Sequence[str], batch: int, opts: FitHeadOptions, generator: torch.Generator,
    random_ids: Optional[torch.Tensor] = None,
) -> list[MaskedBatch]:
    """``sentences`` in order, ``batch`` at a time, tokenised (padded to the batch's longest) and masked."""
    random_ids = random_token_ids(tokenizer) if random_ids is None else random_ids
    out = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(
            list(sentences[start : start + batch]), truncation=True, max_length=opts.max_seq_length, padding=True,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        ids = enc["input_ids"]
        maskable = (enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0)
        masked, selected = mask_tokens(ids, maskable, tokenizer.mask_token_id, random_ids, generator, opts.mask_rate)
        out.append(MaskedBatch(masked, enc["attention_mask"], enc.get("token_type_ids"), selected, ids[selected]))
    return out


def bucketed_order(lengths: Sequence[int], batch: int, generator: torch.Generator, pool: int = 16) -> list[int]:
    """A random order of ``range(len(lengths))`` in which each run of ``batch`` items has similar lengths.

    Shuffle, cut into pools of ``pool × batch`` items, sort each pool by length, cut pools into batches,
    shuffle the batches (less padding than a plain shuffle, still a different grouping each call)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for p in range(0, len(perm), pool * batch):
        chunk = sorted(perm[p : p + pool * batch], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch] for b in range(0, len(chunk), batch)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


# --- frozen encoder: cached features at masked positions ----------------------------------------------------


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
    random_ids = random_token_ids(tokenizer)
    hidden, targets = [], []
    for _ in range(rounds):
        for b in masked_batches(tokenizer, sentences, opts.encode_batch, opts, generator, random_ids):
            out = encoder(**b.encoder_kwargs(device))
            hidden.append(out.last_hidden_state[b.selected.to(device)].float().cpu())
            targets.append(b.targets)
    return MaskedFeatures(torch.cat(hidden), torch.cat(targets))


# --- tuned top layers ---------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the pre-hook of the first tuned layer to stop the frozen forward there."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


@dataclass
class LayerInput:
    """A masked batch as the first tuned layer sees it: ``hidden`` (B, T, H) its input; ``args``/``kwargs``
    the rest of its call (the encoder's prepared attention mask, …); ``selected`` (B, T) bool and ``targets``
    (n,) as in :class:`MaskedBatch`."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    selected: torch.Tensor
    targets: torch.Tensor


class TopLayers:
    """The top ``k`` transformer layers of ``encoder`` (found through its family adapter), run on their own.

    :meth:`capture` runs the encoder up to the input of layer ``L − k`` without gradients; :meth:`forward`
    runs layers ``L − k … L − 1`` (and the final norm of pre-LN families) from there, giving the encoder's
    ``last_hidden_state`` (B, T, H)."""

    def __init__(self, encoder: nn.Module, k: int):
        from ds_kdqat.models import adapter_for

        try:
            adapter = adapter_for(encoder)
        except ValueError as exc:
            raise ConfigError("fit_mlm_head.unfreeze_layers", f"cannot find the encoder's layers: {exc}") from exc
        layers = adapter.layer_modules(encoder)
        if not 1 <= k <= len(layers):
            raise ConfigError(
                "fit_mlm_head.unfreeze_layers",
                f"got {k}; the encoder has {len(layers)} layers (expected 0…{len(layers)})",
            )
        self.encoder = encoder
        self.first = len(layers) - k
        self.layers = layers[self.first :]
        self.indices = list(range(self.first, len(layers)))
        self.final_norm = adapter.final_norm_module(encoder)
        self.prefix = adapter.layers
        self._entry = layers[self.first]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Tuned parameters by name relative to the bare encoder (``encoder.layer.5.output.dense.weight``)."""
        named = {}
        for i, layer in zip(self.indices, self.layers):
            named.update({f"{self.prefix}.{i}.{n}": p for n, p in layer.named_parameters()})
        if self.final_norm is not None:
            norm = _module_name(self.encoder, self.final_norm)
            named.update({f"{norm}.{n}": p for n, p in self.final_norm.named_parameters()})
        return named

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def modules(self) -> list[nn.Module]:
        return self.layers + ([self.final_norm] if self.final_norm is not None else [])

    @torch.no_grad()
    def capture(self, batch: MaskedBatch, device: torch.device) -> LayerInput:
        """Run the frozen lower layers on ``batch``; the input of the first tuned layer (no gradient)."""
        def stop(module, args, kwargs):
            raise _Captured(args, kwargs)

        handle = self._entry.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.encoder(**batch.encoder_kwargs(device))
        except _Captured as got:
            args, kwargs = got.args, got.kwargs
        else:
            raise RuntimeError(f"layer {self.first} of the encoder was never called")
        finally:
            handle.remove()
        return LayerInput(args[0], tuple(args[1:]), dict(kwargs), batch.selected.to(device), batch.targets.to(device))

    def forward(self, inp: LayerInput) -> torch.Tensor:
        """(B, T, H) last hidden state from the captured input of the first tuned layer."""
        hidden = inp.hidden
        for layer in self.layers:
            out = layer(hidden, *inp.args, **inp.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.final_norm(hidden) if self.final_norm is not None else hidden


def _module_name(root: nn.Module, module: nn.Module) -> str:
    base = getattr(root, "base_model", root)
    return next(name for name, m in base.named_modules() if m is module)


# --- evaluation ---------------------------------------------------------------------------------------------


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """logits (n, V), targets (n,) → for each k, the number of rows whose target is among the k largest
    logits (ties broken by :func:`torch.topk`)."""
    top = torch.topk(logits, min(max(ks), logits.shape[1]), dim=1).indices
    found = top == targets.unsqueeze(1)
    return {k: int(found[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Share of rows whose target is among the top k, for each k (0.0 for no rows)."""
    hits = topk_hits(logits, targets, ks)
    return {k: hits[k] / max(1, len(targets)) for k in ks}


@torch.no_grad()
def heldout_topk(
    encoder: nn.Module, head: MLMHead, word_embeddings: torch.Tensor, batches: Sequence[MaskedBatch], ks: Sequence[int]
) -> dict[int, float]:
    """Top-k accuracy at the masked positions of ``batches``, encoder and head in eval mode (full forward)."""
    device = word_embeddings.device
    was_training = head.training
    encoder.eval()
    head.eval()
    hits, n = {k: 0 for k in ks}, 0
    for b in batches:
        hidden = encoder(**b.encoder_kwargs(device)).last_hidden_state[b.selected.to(device)]
        got = topk_hits(head(hidden.float(), word_embeddings), b.targets.to(device), ks)
        hits = {k: hits[k] + got[k] for k in ks}
        n += len(b.targets)
    head.train(was_training)
    return {k: hits[k] / max(1, n) for k in ks}


@dataclass
class CandidateRecall:
    """Held-out check of the candidates: ``words`` eligible single-piece words queried, ``in_top`` of them
    had the original word among the ``m`` candidates; ``share`` = in_top / words."""

    input: str
    m: int
    words: int
    in_top: int
    share: float


def candidate_recall(
    masked_lm, sentences: Sequence[str], stopwords: frozenset[str], m: int, max_words: int, mode: str = "pair",
    batch_size: int = 64,
) -> CandidateRecall:
    """Query ``masked_lm`` (a :class:`~augment.mlm.MaskedLM`) as the augmenter does (candidate source
    ``mlm``, input ``mode``) for the eligible single-piece words of ``sentences`` — whole sentences, in order,
    until at least ``max_words`` words — and count the words found among their own ``m`` candidates."""
    from .augmenter import Augmenter, AugmentParams, word_route
    from .words import WordSplitter

    splitter = WordSplitter(masked_lm.tokenizer)
    params = AugmentParams(num_candidates=m, candidate_source="mlm", mlm_input=mode, batch_size=batch_size)
    chosen, count = [], 0
    for text in sentences:
        if count >= max_words:
            break
        s = splitter.split(text)
        count += sum(word_route(s, j, stopwords, "mlm") == "mlm" for j in range(len(s.words)))
        chosen.append(text)
    tables = Augmenter(splitter, stopwords, params, None, masked_lm).candidate_tables(chosen)
    pairs = [(t.sentence.words[j], cands) for t in tables for j, cands in t.candidates.items()]
    hits = sum(word in cands for word, cands in pairs)
    return CandidateRecall(mode, m, len(pairs), hits, hits / max(1, len(pairs)))


# --- training -----------------------------------------------------------------------------------------------


def make_optimizer(head: MLMHead, tuned: dict[str, nn.Parameter], opts: FitHeadOptions) -> torch.optim.Optimizer:
    """AdamW: the head at ``lr``, the tuned layers at ``encoder_lr``; weight decay on matrices only."""
    def groups(params: Sequence[nn.Parameter], lr: float) -> list[dict]:
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        return [g for g in ({"params": decay, "lr": lr, "weight_decay": opts.weight_decay},
                            {"params": rest, "lr": lr, "weight_decay": 0.0}) if g["params"]]

    return torch.optim.AdamW(groups(list(head.parameters()), opts.lr) + groups(list(tuned.values()), opts.encoder_lr))


def linear_schedule(optim: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Factor on each group's lr at step s (from 0): (s + 1) / W while s < W = round(warmup · total), then
    (total − s) / (total − W)."""
    w = int(round(warmup * total))

    def factor(s: int) -> float:
        if s < w:
            return (s + 1) / w
        return max(0.0, (total - s) / max(1, total - w))

    return torch.optim.lr_scheduler.LambdaLR(optim, factor)


def _total_steps(per_epoch: int, opts: FitHeadOptions) -> int:
    total = per_epoch * opts.epochs
    return total if opts.max_steps is None else min(opts.max_steps, total)


def train_frozen(
    head: MLMHead, emb: torch.Tensor, feats: MaskedFeatures, opts: FitHeadOptions, gen: torch.Generator,
    log: Callable[[str], None],
) -> tuple[int, float]:
    """Head only, on cached features (shuffled tokens, ``batch_size`` a step); returns (steps, last epoch loss)."""
    optim = make_optimizer(head, {}, opts)
    n = len(feats.targets)
    total = _total_steps(math.ceil(n / opts.batch_size), opts)
    sched = linear_schedule(optim, total, opts.warmup)
    step, last_loss = 0, float("nan")
    head.train()
    for epoch in range(opts.epochs):
        perm = torch.randperm(n, generator=gen)
        running, count = 0.0, 0
        for s in range(0, n, opts.batch_size):
            if step >= total:
                break
            idx = perm[s : s + opts.batch_size]
            loss = F.cross_entropy(head(feats.hidden[idx].to(emb.device), emb), feats.targets[idx].to(emb.device))
            _step(optim, sched, loss)
            step += 1
            running += loss.item() * len(idx)
            count += len(idx)
        if count:
            last_loss = running / count
            log(f"epoch {epoch + 1}: train loss {last_loss:.4f} ({step} steps)")
        if step >= total:
            break
    head.eval()
    return step, last_loss


def train_top(
    head: MLMHead, emb: torch.Tensor, top: TopLayers, cached: Sequence[LayerInput], opts: FitHeadOptions,
    gen: torch.Generator, log: Callable[[str], None],
) -> tuple[int, float]:
    """Head and top layers, one cached batch a step (shuffled each epoch); returns (steps, last epoch loss)."""
    tuned = top.named_parameters()
    for p in tuned.values():
        p.requires_grad_(True)
    optim = make_optimizer(head, tuned, opts)
    total = _total_steps(len(cached), opts)
    sched = linear_schedule(optim, total, opts.warmup)
    step, last_loss = 0, float("nan")
    head.train()
    top.train()
    t0 = time.perf_counter()
    for epoch in range(opts.epochs):
        running, count = 0.0, 0
        for i in torch.randperm(len(cached), generator=gen).tolist():
            if step >= total:
                break
            inp = cached[i]
            hidden = top.forward(inp)[inp.selected]
            loss = F.cross_entropy(head(hidden, emb), inp.targets)
            _step(optim, sched, loss)
            step += 1
            running += loss.item() * len(inp.targets)
            count += len(inp.targets)
        if count:
            last_loss = running / count
            log(f"epoch {epoch + 1}: train loss {last_loss:.4f} ({step} steps, {time.perf_counter() - t0:.0f} s)")
        if step >= total:
            break
    head.eval()
    top.train(False)
    for p in tuned.values():
        p.requires_grad_(False)
    return step, last_loss


def _step(optim: torch.optim.Optimizer, sched, loss: torch.Tensor) -> None:
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()


def cache_top_inputs(
    top: TopLayers, tokenizer, sentences: Sequence[str], opts: FitHeadOptions, gen: torch.Generator,
    device: torch.device,
) -> list[LayerInput]:
    """``rounds`` maskings of ``sentences`` in length-bucketed random batches of ``sentence_batch``, each
    run through the frozen lower layers once: the tuned layers' inputs (on ``device``)."""
    random_ids = random_token_ids(tokenizer)
    encoded = tokenizer(list(sentences), truncation=True, max_length=opts.max_seq_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    cached = []
    for _ in range(opts.rounds):
        order = bucketed_order(lengths, opts.sentence_batch, gen)
        batches = masked_batches(tokenizer, [sentences[i] for i in order], opts.sentence_batch, opts, gen, random_ids)
        cached += [top.capture(b, device) for b in batches]
    return cached


# --- the fit ------------------------------------------------------------------------------------------------


def split_holdout(sentences: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle, the first ``round(holdout · n)`` (at least 1) held out."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, int(round(len(sentences) * holdout)))
    return [sentences[i] for i in order[n_hold:]], [sentences[i] for i in order[:n_hold]]


def fit_mlm_head(
    encoder, tokenizer, sentences: Sequence[str], opts: FitHeadOptions, log: Callable[[str], None] = print,
    stopwords: Optional[frozenset[str]] = None,
) -> tuple[MLMHead, dict]:
    """Fit a head on ``encoder`` (its top ``opts.unfreeze_layers`` layers tuned in place, the rest frozen).

    Returns the head (CPU, eval; with the tuned layers' tensors in ``head.encoder_tensors``) and the fit's
    figures (see the module docstring); ``stopwords`` for the candidate check (default: the packaged list).
    """
    opts.validate()
    sentences = [s for s in sentences if s.strip()]
    if len(sentences) < 10:
        raise ConfigError("fit_mlm_head.input", f"need at least 10 non-empty sentences, got {len(sentences)}")
    if opts.eval_words:
        _check_wordpiece(tokenizer)
    started = time.perf_counter()
    train, held = split_holdout(sentences, opts.holdout, opts.seed)
    torch.manual_seed(opts.seed)
    encoder = encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    device = next(encoder.parameters()).device
    emb = encoder.get_input_embeddings().weight.detach().float()
    config = encoder.config
    head = MLMHead(config.hidden_size, emb.shape[0], config.layer_norm_eps, getattr(config, "hidden_act", "gelu"))
    head = head.to(device)
    m = opts.num_candidates
    ks = (1, m)

    gen = torch.Generator().manual_seed(opts.seed)
    held_gen = torch.Generator().manual_seed(opts.seed + 1)  # one fixed masking of the held-out sentences
    held_batches = masked_batches(tokenizer, held, opts.encode_batch, opts, held_gen)
    before = heldout_topk(encoder, head, emb, held_batches, ks)
    log(f"held-out masked tokens ({sum(len(b.targets) for b in held_batches)}): before top-1 {before[1]:.4f}, "
        f"top-{m} {before[m]:.4f}")
    k = opts.unfreeze_layers
    log(f"{len(train)} training sentences x {opts.rounds} maskings, {len(held)} held out; "
        + (f"tuning the top {k} layers with the head" if k else "frozen encoder, head only"))
    t0 = time.perf_counter()
    if k == 0:
        feats = encode_masked(encoder, tokenizer, train, opts.rounds, opts, gen)
        n_masked = len(feats.targets)
        log(f"encoded {n_masked} masked tokens in {time.perf_counter() - t0:.0f} s")
        steps, last_loss = train_frozen(head, emb, feats, opts, gen, log)
        top = None
    else:
        top = TopLayers(encoder, k)
        cached = cache_top_inputs(top, tokenizer, train, opts, gen, device)
        n_masked = sum(len(c.targets) for c in cached)
        log(f"cached the inputs of layer {top.first} for {len(cached)} batches ({n_masked} masked tokens) "
            f"in {time.perf_counter() - t0:.0f} s")
        steps, last_loss = train_top(head, emb, top, cached, opts, gen, log)
        del cached
    train_seconds = time.perf_counter() - t0
    after = heldout_topk(encoder, head, emb, held_batches, ks)
    log(f"held-out masked tokens: after top-1 {after[1]:.4f}, top-{m} {after[m]:.4f}")
    recall = None
    if opts.eval_words:
        recall = evaluate_candidates(encoder, head, emb, tokenizer, held, opts, stopwords)
        log(f"held-out eligible single-piece words ({recall.words}, {recall.input} input): original word among "
            f"the top-{m} candidates {recall.share:.4f}")
    if top is not None:
        head.encoder_tensors = {n: p.detach().cpu().clone() for n, p in top.named_parameters().items()}
        head.tuned_layers = list(top.indices)
    head = head.cpu().eval()
    stats = {
        "train_sentences": len(train),
        "heldout_sentences": len(held),
        "train_masked_tokens": n_masked,
        "heldout_masked_tokens": sum(len(b.targets) for b in held_batches),
        "unfreeze_layers": k,
        "tuned_layers": list(head.tuned_layers),
        "steps": steps,
        "final_train_loss": last_loss,
        "heldout_top1_before": before[1],
        f"heldout_top{m}_before": before[m],
        "heldout_top1_after": after[1],
        f"heldout_top{m}_after": after[m],
        "candidate_recall": asdict(recall) if recall is not None else None,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "options": asdict(opts),
    }
    return head, stats


def evaluate_candidates(
    encoder, head: MLMHead, emb: torch.Tensor, tokenizer, held: Sequence[str], opts: FitHeadOptions,
    stopwords: Optional[frozenset[str]],
) -> CandidateRecall:
    """:func:`candidate_recall` of the fitted encoder + head on the held-out sentences."""
    from .mlm import MaskedLM
    from .stopwords import load_stopwords

    device = emb.device
    head.eval()
    lm = MaskedLM(tokenizer, encoder, lambda h: head(h, emb), device, {"note": "fit_mlm_head evaluation"})
    words = stopwords if stopwords is not None else load_stopwords()
    return candidate_recall(lm, held, words, opts.num_candidates, opts.eval_words, opts.eval_input)


def _check_wordpiece(tokenizer) -> None:
    from .words import WordSplitter

    try:
        WordSplitter(tokenizer)
    except ConfigError as exc:
        raise ConfigError(
            "fit_mlm_head.eval_words", f"the candidate check needs a WordPiece tokenizer ({exc}); set eval_words to 0"
        ) from exc
