"""The layer table of any JAX program: shapes, parameters, MACs, memory, receptive fields.

`analyze(model, input_shape)` traces the model's forward pass to a jaxpr (a Linen module's
`apply` in evaluation mode, an NNX module's call, or a function `f(params, x)`; nothing is
allocated or compiled) and follows the image through it primitive by primitive
(`cnnjax.analysis.rules`), entering jit, custom-derivative and remat calls. Steps are grouped
into one row per layer call (`cnnjax.analysis.table`). Conv and pool output sizes are
recomputed from `cnnjax.geometry`'s formulas and checked against the trace, conv and dense
parameter counts against their variables; invalid geometry raises a `GeometryError` naming the
layer before the layer runs.

Conventions:
- Parameters: each variable counted once, in the row that first reads it; a later call that
  reuses it says so. Non-trainable variables (BatchNorm statistics) are `state`.
- MACs: one multiply-add = 1, per image; bias adds are not counted, nor are pooling, activation,
  normalisation or residual adds (they are not multiply-adds). Padded taps count, as in the
  notes' formula out_h*out_w*out_c*k_h*k_w*in_c/groups; XLA's cost analysis counts only the taps
  that land on real pixels (see `geometry.valid_taps`). A transposed convolution counts the taps
  on real pixels only, as torchinfo does.
- Memory, as torchsummary: activations = 2 x (forward + backward) the outputs of every row except
  element-wise activations, dropout and views (in-place), x batch size; parameters and the input
  at their dtype sizes; MB = 1024**2 bytes. `cnnjax.analysis.memory` plans a training step.
- Receptive field per axis: `rf` input pixels, `jump` input pixels between adjacent output units,
  `start` the centre of the first output unit (pixel centres at 0.5, 1.5, ...). Flattening and
  global reductions take the whole map (a window as large as the map); element-wise operations
  keep it; where paths meet (an add, a concatenation of channels) the table takes the hull of
  their windows and warns when they are not aligned. A primitive without a rule, a transposed
  convolution with stride > 1 and paths with different jumps make it unknown (None) from there
  on, with a warning naming the primitive and the layer.
"""

from cnnjax.analysis.calls import LeafCalls, layer_name
from cnnjax.analysis.rules import AnalysisError
from cnnjax.analysis.table import Analysis, Row, Totals, analyze, fold, smallest_input
from cnnjax.analysis.xla import xla_check
from cnnjax.geometry import GeometryError

__all__ = [
    "Analysis", "AnalysisError", "GeometryError", "LeafCalls", "Row", "Totals", "analyze",
    "fold", "layer_name", "smallest_input", "xla_check",
]  # fmt: skip
