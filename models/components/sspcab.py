"""SSPCAB (Ristea et al., "Self-Supervised Predictive Convolutional Attentive Block for Anomaly
Detection", CVPR 2022).

A drop-in layer that must predict each position from its surroundings only: a masked convolution
whose receptive field is four ``k x k`` sub-kernels in the corners of a square, the centre
(``(2d + 1) x (2d + 1)`` around the position, ``d`` the dilation) hidden, followed by a ReLU and
a squeeze-and-excitation channel attention. Trained with an extra loss, the mean squared error
between the block's input and output, it learns to reconstruct masked content from context, which
a reconstruction network for anomaly detection then does poorly on anomalies.

The four sub-kernels are four weight tensors placed into the corners of one zero kernel, so the
block runs as a single convolution; it has one bias (the paper's four summed biases are one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SSPCAB"]


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attentive block (output shape = input shape).

    Args:
        channels: input (and output) channels.
        kernel_size: side ``k`` of each of the four corner sub-kernels (the paper's 1).
        dilation: distance ``d`` from the masked centre to the sub-kernels (the paper's 1); the
            hidden centre is ``(2d + 1) x (2d + 1)`` and the whole receptive field
            ``(2k + 2d + 1)`` square.
        reduction: channel reduction ratio of the squeeze-and-excitation attention (8).

    ``forward(x)`` returns the block's output; :meth:`loss` the self-supervised reconstruction
    loss of an ``(input, output)`` pair.
    """

    def __init__(
        self, channels: int, kernel_size: int = 1, dilation: int = 1, reduction: int = 8
    ) -> None:
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("kernel_size", kernel_size),
            ("dilation", dilation),
            ("reduction", reduction),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SSPCAB: {name} must be a positive int, got {value!r}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.span = 2 * kernel_size + 2 * dilation + 1
        # One k x k sub-kernel per corner, initialised as a k x k convolution would be.
        corners = torch.empty(4, channels, channels, kernel_size, kernel_size)
        for corner in corners:
            nn.init.kaiming_uniform_(corner, a=5**0.5)
        self.corners = nn.Parameter(corners)
        bound = 1 / (channels * kernel_size * kernel_size) ** 0.5
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def kernel(self) -> Tensor:
        """The full masked ``C x C x span x span`` kernel: zero except in the four corners."""
        k, c = self.kernel_size, self.corners.shape[1]
        kernel = self.corners.new_zeros(c, c, self.span, self.span)
        far = self.span - k
        kernel[:, :, :k, :k] = self.corners[0]
        kernel[:, :, :k, far:] = self.corners[1]
        kernel[:, :, far:, :k] = self.corners[2]
        kernel[:, :, far:, far:] = self.corners[3]
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        # Zero padding keeps the size: the corners reach k + d pixels beyond a border position.
        y = F.relu(F.conv2d(x, self.kernel(), self.bias, padding=self.span // 2))
        attention = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean(dim=(2, 3))))))
        return y * attention[:, :, None, None]

    @staticmethod
    def loss(inputs: Tensor, outputs: Tensor) -> Tensor:
        """The block's self-supervised loss: mean squared error between its input and output."""
        return F.mse_loss(outputs, inputs)
