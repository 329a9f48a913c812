"""The focal loss that trains DiffAD's segmenter (Lin et al.; as in DRAEM).

Synthetic anomalies cover a few percent of the pixels, so plain cross entropy
is dominated by easy normal pixels; the factor ``(1 - p_t) ** gamma`` scales
those down. ``gamma = 0`` is exactly the cross entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over pixels of ``-(1 - p_t) ** gamma * log(p_t)``.

    ``logits`` (N, 2, H, W): class 0 normal, class 1 anomalous; ``p`` is their
    softmax and ``p_t`` the probability of the true class given by the binary
    ``mask`` (N, 1, H, W) or (N, H, W). The log comes from ``log_softmax`` so that
    confident logits do not underflow to ``log(0)``.
    """
    target = mask.reshape(mask.shape[0], *mask.shape[-2:]).round().long()
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    weight = (1.0 - log_pt.exp()).clamp(min=0.0) ** gamma
    return -(weight * log_pt).mean()
