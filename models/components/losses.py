"""Training losses of the detectors that learn to segment synthetic anomalies (DRAEM, MemSeg).

- :func:`ssim`: the structural similarity index (Wang et al., "Image Quality Assessment: From
  Error Visibility to Structural Similarity", TIP 2004) with a Gaussian window, per channel,
  averaged over the image; ``1 - ssim`` is DRAEM's structural reconstruction loss.
- :func:`focal_loss`: Lin et al.'s focal loss ("Focal Loss for Dense Object Detection", ICCV
  2017) for per-pixel two-class segmentation: the cross-entropy of each pixel weighted by
  ``(1 - p_t) ** gamma``, which turns the loss of the many easy (normal) pixels down so the few
  anomalous ones are not drowned out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["focal_loss", "gaussian_window", "ssim"]


def gaussian_window(size: int, sigma: float, *, dtype=None, device=None) -> Tensor:
    """A normalised 1-D Gaussian window of ``size`` taps and standard deviation ``sigma``."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (window / window.sum()).to(dtype=dtype or torch.float32, device=device)


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> Tensor:
    """Mean structural similarity of two ``B x C x H x W`` batches (a scalar, 1 = identical).

    Local means, variances and the covariance come from a separable ``window_size`` Gaussian
    window (the original 11 x 11, sigma 1.5) applied to each channel with zero padding, so the
    index is defined at every pixel of any image at least one pixel large; the stabilising
    constants are ``(0.01 L)^2`` and ``(0.03 L)^2`` with ``L = data_range``.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two B x C x H x W batches of one shape, got {x.shape}, {y.shape}"
        )
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"ssim: window_size must be odd and positive, got {window_size}")
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    pad = window_size // 2
    row, column = window.view(1, 1, 1, -1), window.view(1, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:
        # Separable filtering, one group per channel: two 1-D passes instead of an 11 x 11 one.
        t = F.conv2d(t, row.expand(channels, 1, 1, -1), padding=(0, pad), groups=channels)
        return F.conv2d(t, column.expand(channels, 1, -1, 1), padding=(pad, 0), groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.mean()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean per-pixel focal loss of two-class logits ``B x 2 x H x W`` against a 0/1 mask.

    ``target`` is ``B x H x W`` or ``B x 1 x H x W`` (1 = anomalous, the logits' channel 1).
    ``gamma = 0`` gives the plain cross-entropy. Computed from log-softmax, so it stays finite
    for any logits (no clamping of probabilities needed).
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, target.long().unsqueeze(1))[:, 0]
    weight = (1.0 - log_pt.exp()).clamp_min(0.0) ** gamma
    return -(weight * log_pt).mean()
