"""A likelihood-ratio membership attack on unlearned classifiers (LiRA, Carlini et al. 2022, offline).

MIA-efficacy (SalUn's SVC on confidences) is a weak attacker. LiRA asks, per example, whether the
target model's confidence is higher than models that never trained on the example would give it.
The offline variant needs only such "out" models: here the shadows are retrained models (the
retrain recipe, other seeds) on the retain set, so every forget sample and every test sample is
out for every shadow. For each example x with label y the statistic is the logit-scaled confidence
phi = z_y - logsumexp(z_j, j != y); over the shadows it is fitted by a Gaussian (per-example mean;
the variance pooled over all examples, as Carlini et al. recommend with few shadows), and the
attack's score is the one-sided CDF of the target model's phi under it (high = "member").

The attack tells forget samples (called members) from held-out samples of the same classes (non-
members): test images, or for class-wise forgetting the test images of the forgotten class. A model
that has truly forgotten scores like the retrained model (AUC near 50 %).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from classifiers.data import ForgetSplit
from classifiers.metrics import predict_logits
from erasure.datasets import Dataset, ImageSet
from erasure.errors import ErasureError
from erasure.evaluation.protocol import ProtocolCard

PROTOCOL = ProtocolCard("lira-offline", 1, "Offline LiRA on forget vs held-out samples: AUC and TPR at 1% FPR")
LOW_FPR = 0.01


def logit_confidence(logits: Tensor, labels: Tensor) -> np.ndarray:
    """phi = z_y - logsumexp over the other classes: log(p_y / (1 - p_y)), computed without rounding to 1."""
    logits = logits.double()
    labels = labels.cpu().long()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def non_members(data: Dataset, split: ForgetSplit) -> ImageSet:
    """Held-out examples comparable to the forget set: the forgotten class's test images, or the whole test set."""
    if split.forget_class is None:
        return data.test
    return data.test.subset(data.test.labels == split.forget_class)


class OfflineLiRA:
    """The shadows' out-distribution of phi on a fixed set of examples, and the attack against a target model."""

    def __init__(self, shadows: list[nn.Module], examples: ImageSet):
        if len(shadows) < 2:
            raise ErasureError(f"LiRA needs at least 2 shadow models to fit its Gaussians, got {len(shadows)}; "
                               "set lira_shadows to 2 or more")
        self.examples = examples
        phis = np.stack([logit_confidence(predict_logits(m, examples), examples.labels) for m in shadows])
        self.mean = phis.mean(axis=0)
        self.std = float(np.sqrt(((phis - self.mean) ** 2).sum() / (phis.size - phis.shape[1]))) + 1e-12

    def scores(self, model: nn.Module) -> np.ndarray:
        """Per example: the probability that an out model gives phi below the target's (high = member)."""
        phi = logit_confidence(predict_logits(model, self.examples), self.examples.labels)
        from scipy.special import ndtr

        return ndtr((phi - self.mean) / self.std)


def attack_metrics(member_scores: np.ndarray, non_member_scores: np.ndarray) -> dict[str, float]:
    """ROC AUC and the true-positive rate at 1 % false positives (percent) of telling members from non-members."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    scores = np.concatenate([member_scores, non_member_scores])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"LiRA.AUC": 100.0 * float(roc_auc_score(labels, scores)),
            "LiRA.TPR@1%": 100.0 * float(np.interp(LOW_FPR, fpr, tpr))}


class ForgetMembershipAttack:
    """LiRA fitted once for a split: `attack(model)` gives its metrics on forget vs non-member examples."""

    def __init__(self, shadows: list[nn.Module], data: Dataset, split: ForgetSplit):
        self.members = OfflineLiRA(shadows, split.forget(data))
        self.non_members = OfflineLiRA(shadows, non_members(data, split))
        self.shadows = len(shadows)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return attack_metrics(self.members.scores(model), self.non_members.scores(model))
