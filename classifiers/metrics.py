"""The metrics the unlearning literature reports (protocol `classifier-v1`).

UA = 1 - accuracy on the forget set; RA = accuracy on the retain set; TA = accuracy on the test
set (class-wise: the test images of the remaining classes); MIA-efficacy as SalUn defines it: an
RBF SVC on the true-class confidence, trained with retain samples as members and test samples as
non-members (balanced), reports the share of forget samples it calls non-members. Avg.Gap is the
mean absolute difference to the retrained model over UA, RA, TA and MIA-efficacy. All in percent.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from classifiers.data import ForgetSplit
from classifiers.models import to_input
from erasure.datasets import Dataset, ImageSet
from erasure.evaluation.protocol import ProtocolCard
from erasure.training import evaluating

PROTOCOL = ProtocolCard("classifier", 1, "Classifier unlearning: UA, RA, TA, MIA-efficacy and Avg.Gap to retrain")
GAP_METRICS = ("UA", "RA", "TA", "MIA")


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> Tensor:
    """Float logits of `model` on every image of `data`, on the CPU (eval mode, restored afterwards)."""
    with evaluating(model):
        outputs = [model(to_input(data.images[i:i + batch_size])).float() for i in range(0, len(data), batch_size)]
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs).cpu()


def predict_proba(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> Tensor:
    """Softmax outputs of `model` on every image of `data`."""
    return torch.softmax(predict_logits(model, data, batch_size), dim=1)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (probs.argmax(1) == labels.cpu()).float().mean().item() if len(labels) else float("nan")


def true_class_confidence(probs: Tensor, labels: Tensor) -> np.ndarray:
    """The probability each example gives its own label."""
    return probs.gather(1, labels.cpu().long()[:, None]).squeeze(1).numpy()


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Share (percent) of `target` confidences that an SVC trained member-vs-non-member calls non-members."""
    from sklearn.svm import SVC

    n = min(len(member), len(non_member))
    rng = np.random.default_rng(seed)
    member = rng.choice(member, n, replace=False)
    non_member = rng.choice(non_member, n, replace=False)
    features = np.concatenate([member, non_member])[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    classifier = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    return 100.0 * float(1.0 - classifier.predict(target[:, None]).mean())


def evaluate(model: nn.Module, data: Dataset, split: ForgetSplit, seed: int = 0, validation: bool = False
             ) -> dict[str, float]:
    """UA, RA, TA, MIA-efficacy (percent) of `model` for one forget split.

    With `validation`, the validation split stands in for the test split (in TA and as MIA's non-members):
    what a settings search may select on without looking at the test set.
    """
    held_out = data.val if validation else data.test
    forget, retain, test = split.forget(data), split.retain(data), split.held_out(held_out)
    p_forget, p_retain, p_test = (predict_proba(model, s) for s in (forget, retain, test))
    return {
        "UA": 100.0 - accuracy(p_forget, forget.labels),
        "RA": accuracy(p_retain, retain.labels),
        "TA": accuracy(p_test, test.labels),
        "MIA": mia_efficacy(true_class_confidence(p_retain, retain.labels),
                            true_class_confidence(p_test, test.labels),
                            true_class_confidence(p_forget, forget.labels), seed=seed),
    }


def average_gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Mean absolute difference to the retrained model over UA, RA, TA and MIA-efficacy."""
    return float(np.mean([abs(metrics[k] - reference[k]) for k in GAP_METRICS]))
