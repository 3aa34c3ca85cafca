"""Did a conditional prior draw what it was asked? A classifier fitted on the training views'
EfficientNet-Lite0 features (scikit-learn's logistic regression; one per label, one-vs-rest, when
an image may have several) says which labels a sample shows. Its own accuracy on training views
it did not see is the ceiling a sample's score is read against: a prior cannot be recognised more
reliably than real images of its labels are. Single-label sets score accuracy, multi-hot ones mean
average precision; and each label with enough images gets its own Fréchet distance."""

from __future__ import annotations

import numpy as np
import torch

from imgvae.metrics.distances import frechet_distance, kernel_distance

HELD_OUT_EVERY = 3  # every third training view is kept from the classifier, for its ceiling
MIN_PER_LABEL = 16  # views of a label (real and sampled) for a per-label Fréchet distance


class LabelClassifier:
    """Which labels (of `vocabulary`) images show, from their features, fitted on real views' features
    (n, d) and label sets (n tuples of names); `ceiling`: its score on the views it was not fitted on."""

    def __init__(self, features: torch.Tensor, sets: list[tuple[str, ...]], vocabulary: list[str]):
        from sklearn.linear_model import LogisticRegression  # here: scikit-learn takes a second to import
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.vocabulary = vocabulary
        self.multi = any(len(s) > 1 for s in sets)
        x, y = features.double().numpy(), self.targets(sets)
        labelled = np.flatnonzero(y.sum(1) > 0)
        held = labelled[::HELD_OUT_EVERY]
        fit = np.setdiff1d(labelled, held)
        head = OneVsRestClassifier(LogisticRegression(max_iter=2000)) if self.multi else LogisticRegression(
            max_iter=2000)
        self.model = make_pipeline(StandardScaler(), head)
        self.model.fit(x[fit], y[fit] if self.multi else y[fit].argmax(1))
        self.metric = "mAP" if self.multi else "accuracy"
        self.ceiling = self.score(features[held], [sets[i] for i in held])

    def targets(self, sets: list[tuple[str, ...]]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.vocabulary)}
        y = np.zeros((len(sets), len(self.vocabulary)), np.int64)
        for row, names in enumerate(sets):
            y[row, [index[n] for n in names if n in index]] = 1
        return y

    def score(self, features: torch.Tensor, sets: list[tuple[str, ...]]) -> float:
        """Accuracy (single labels) or mean average precision (multi-hot) of images asked to show `sets`."""
        y = self.targets(sets)
        keep = y.sum(1) > 0  # an image asked for nothing has no right answer
        if not keep.any():
            return float("nan")
        x = features.double().numpy()[keep]
        if not self.multi:
            return float((self.model.predict(x) == y[keep].argmax(1)).mean())
        from sklearn.metrics import average_precision_score

        present = y[keep].sum(0) > 0
        return float(average_precision_score(y[keep][:, present], self.model.predict_proba(x)[:, present],
                                             average="macro"))


def label_classifier(features: torch.Tensor, sets: list[tuple[str, ...]],
                     vocabulary: list[str]) -> LabelClassifier | None:
    """LabelClassifier of these views, or None when they show fewer than two labels or are too few
    to keep some from it (no ceiling, no score)."""
    shown = {name for s in sets for name in s if name in vocabulary}
    if len(shown) < 2 or sum(bool(s) for s in sets) < 2 * HELD_OUT_EVERY:
        return None
    return LabelClassifier(features, sets, vocabulary)


def per_label_distances(real: torch.Tensor, real_sets: list, samples: torch.Tensor, asked: list,
                        vocabulary: list[str]) -> dict[str, dict]:
    """{label: {"fd_effnet", "kid_effnet", "images"}}: each label with MIN_PER_LABEL real views and as many samples
    asked for it, real views of the label against samples asked for it."""
    out = {}
    for name in vocabulary:
        mine = [i for i, s in enumerate(real_sets) if name in s]
        theirs = [i for i, s in enumerate(asked) if name in s]
        if min(len(mine), len(theirs)) >= MIN_PER_LABEL:
            a, b = real[mine], samples[theirs]
            out[name] = {"fd_effnet": frechet_distance(a, b), "kid_effnet": kernel_distance(a, b),
                         "images": min(len(mine), len(theirs))}
    return out
