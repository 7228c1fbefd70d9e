"""gcl-ops: fast Generalized Contrastive Learning (GCL) for ranked retrieval.

Public API:

* ``score_to_weight``, ``score_from_count``: relevance scores to loss weights (paper Eq. 1-3).
* ``gcl_loss``, ``gcl_loss_from_logits``, ``GCLLoss``: the weighted bidirectional contrastive loss
  (paper Eq. 4), a drop-in for open_clip's ``ClipLoss``.
* ``multi_field_gcl_loss``, ``MultiFieldGCLLoss``: multi-field GCL (paper Eq. 5).
* ``metrics``: batched NDCG, ERR, RBP, MRR, Recall, MAP and ``rank`` (scores -> ranked grades).
* ``topk``, ``Qrels``, ``evaluate``: exact streaming retrieval and evaluation against qrels.

``gcl_ops.reference`` holds the plain-PyTorch definitions (the test oracle); ``gcl_ops.testing``
holds hypothesis strategies and ``assert_matches_reference`` for testing your own integration
(it needs the ``test`` extra).
"""

from gcl_ops import metrics
from gcl_ops.contrastive import GCLLoss, gcl_loss, gcl_loss_from_logits
from gcl_ops.multifield import MultiFieldGCLLoss, multi_field_gcl_loss
from gcl_ops.retrieval import Qrels, evaluate, topk
from gcl_ops.weights import WEIGHT_KINDS, score_from_count, score_to_weight

__version__ = "0.1.0"

__all__ = [
    "GCLLoss",
    "MultiFieldGCLLoss",
    "Qrels",
    "WEIGHT_KINDS",
    "evaluate",
    "gcl_loss",
    "gcl_loss_from_logits",
    "metrics",
    "multi_field_gcl_loss",
    "score_from_count",
    "score_to_weight",
    "topk",
]
