"""Model FLOPs of a step with torch.utils.flop_counter, with two counting gaps closed.

``FlopCounterMode`` (torch 2.14) has two gaps that matter here:
  * the CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
    backward) has no formula, so AST's attention counts as zero on CPU; it gets torch's own
    SDPA formulas;
  * ``convolution_backward`` ignores ``groups`` in the weight-gradient term, counting a
    depthwise convolution's weight gradient ``channels`` times over (EfficientNet's backward
    came out 35x its forward). Each requested gradient of a convolution costs what its forward
    costs, which is what the replacement counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

aten = torch.ops.aten


def conv_forward_flops(grad_out_shape: Any, w_shape: Any) -> int:
    """2 x multiply-adds of a (grouped) convolution: out elements x (C_in/groups x kernel)."""
    return 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])


def conv_backward_flops(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: Any,
    output_mask: Any,
    out_shape: Any = None,
) -> int:
    """Input and weight gradients of a convolution: one forward's FLOPs each, when asked for."""
    # the forward's output is grad_out (its input, for a transposed convolution)
    produced = x_shape if transposed else grad_out_shape
    per_grad = conv_forward_flops(produced, w_shape)
    return per_grad * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FIXES = {
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
    aten.convolution_backward: conv_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with the fixes above."""
    return FlopCounterMode(display=False, custom_mapping=FIXES)
