"""TinyBERT-style data augmentation (word replacement) for the small GLUE tasks.

For each sentence: split into words (BERT basic tokenization); leave stop words and non-alphabetic words
alone; a word of one WordPiece gets the masked LM's top-M predictions at its position as candidates, a word
of several pieces its M nearest GloVe neighbours by cosine; N times, replace each eligible word by a random
candidate with probability p; keep the original, drop duplicates.

Library entry points:

- :func:`augment.job.run_shard` (``AugmentConfig`` → augmented GLUE tsv + manifest; sharded, resumable);
- :func:`augment.build.build_augmenter` and :meth:`augment.augmenter.Augmenter.augment` (in-memory);
- :func:`augment.fit_head.fit_mlm_head` (a masked-LM head for encoders that have none).

Command lines: ``run/augment.py`` and ``run/fit_mlm_head.py``.
"""

from .config import AugmentConfig, GloveConfig, JobConfig, MLMConfig, NUM_NEW_PER_TASK

__all__ = ["AugmentConfig", "GloveConfig", "JobConfig", "MLMConfig", "NUM_NEW_PER_TASK"]
