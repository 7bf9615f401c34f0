"""Safety-state probe: P(safe) = sigmoid(w.h + b) on the final-norm hidden state (SafetyReminder §3).

The official recipe (PCA-20 -> first 4 components -> logistic regression) is linear end to end, so it is
folded into one vector and a bias: w = coef @ components[:4], b = intercept - w . mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sr_ray.reminder.artifacts import check_base_model, load_artifact, save_artifact
from sr_ray.reminder.guard import PAPER_THRESHOLD


@dataclass
class HarmProbe:
    weight: torch.Tensor  # (D,) float32
    bias: float
    threshold: float = PAPER_THRESHOLD  # flag when P(safe) < threshold; a bundle's own threshold wins
    base_model_id: str = ""
    fit_info: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    def p_safe(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(hidden.device)
        return torch.sigmoid(hidden.float() @ w + self.bias)

    @classmethod
    def fit(
        cls, features: torch.Tensor | np.ndarray, safe: torch.Tensor | np.ndarray, *,
        n_components: int = 20, top_m: int = 4, threshold: float = PAPER_THRESHOLD, base_model_id: str = "", seed: int = 0,
    ) -> "HarmProbe":
        """Official recipe: PCA(n_components) on all features, logistic regression on the first top_m."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(safe).astype(int)
        pca = PCA(n_components=min(n_components, *x.shape), random_state=seed).fit(x)
        z = pca.transform(x)[:, :top_m]
        clf = LogisticRegression().fit(z, y)
        w = clf.coef_[0] @ pca.components_[:top_m]
        b = float(clf.intercept_[0] - w @ pca.mean_)
        info = dict(recipe=f"PCA-{n_components} -> first {top_m} -> LogisticRegression", n_train=len(y),
                    n_safe=int(y.sum()), explained_variance=pca.explained_variance_ratio_[:top_m].tolist())
        return cls(torch.tensor(w, dtype=torch.float32), b, threshold, base_model_id, info)

    def save(self, directory: str | Path) -> Path:
        meta = dict(base_model_id=self.base_model_id, hidden_size=self.hidden_size, threshold=self.threshold,
                    bias=self.bias, fit_info=self.fit_info)
        return save_artifact(directory, "harm_probe", {"weight": self.weight}, meta)

    @classmethod
    def load(cls, directory: str | Path, vlm=None) -> "HarmProbe":
        tensors, meta = load_artifact(directory, "harm_probe")
        if vlm is not None:
            check_base_model(meta, vlm.model_id, vlm.hidden_size, directory)
        return cls(tensors["weight"], float(meta["bias"]), float(meta["threshold"]), meta["base_model_id"],
                   meta.get("fit_info", {}))
