"""Reference trainer for multi-field GCL on MarqoGS-10M with open_clip models.

What a practitioner copies to train GCL with gcl-ops (it uses only gcl-ops' public API):

* ``data``: MarqoGS-10M as published (Hugging Face parquet shards with image bytes, or the earlier
  CSV/JSON release), streamed row group by row group, batches that mix many queries,
  deterministic and resumable; the evaluation splits, corpora and query sampling;
* ``synthetic``: a generator of MarqoGS-10M-shaped data with graded relevance (tests, demo);
* ``model``: open_clip models by name, local pretrained weights, a tiny config for CPUs;
* ``train``: multi-field GCL training (gradient caching, DDP, resume);
* ``evaluate``: the four-split evaluation (NDCG@10, ERR, RBP);
* ``cli``: ``python -m reference_trainer make-synthetic | train | eval``.
"""
