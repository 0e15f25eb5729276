"""Triton kernels of the fused linear + cross-entropy (no N x V logits in memory).

triton_forward(hidden, weight, bias, targets, opts) -> (loss [N] fp32, lse [N] fp32)
    z = softcap(logit_scale * (hidden @ weight.T + bias)) with fp32 accumulation, softcap(x) = s*tanh(x/s);
    lse_i = logsumexp_j z_ij for every row; loss_i = (1-eps)(lse_i - z[i,t_i]) + eps(lse_i - mean_j z_ij),
    0 where t_i == ignore_index, NaN where t_i is outside [0, V) and not ignore_index.

triton_backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse, opts) -> (d_hidden, d_weight, d_bias)
    dz = (g + gl) softmax - g ((1-eps) onehot(t) + eps/V) with g = grad_loss * (t != ignore_index),
    gl = grad_lse (None == 0); draw = dz * logit_scale * (1 - (z/s)^2 if softcap); d_hidden = draw @ W,
    d_weight = draw.T @ hidden, d_bias = draw.sum(0). draw is rounded to the input dtype before the matmuls
    (as eager does); accumulation is fp32. Rows with an out-of-range target get NaN gradients.

Both accept an optional ``config=KernelConfig(...)`` (see :mod:`.config`); no host synchronisation.
"""
from .backward import triton_backward
from .config import KernelConfig, Tile, pick_config
from .fast import triton_chunked_forward, triton_fast_forward
from .forward import triton_forward
from .scale import scale_in_place

__all__ = ["triton_forward", "triton_backward", "triton_chunked_forward", "triton_fast_forward", "KernelConfig", "Tile", "pick_config",
           "scale_in_place"]
