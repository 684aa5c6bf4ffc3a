"""tucker-ops: Tucker-decomposed Conv2d and Linear layers, run by fused torch ops.

Typical use::

    import tucker_ops
    model, report = tucker_ops.compress(model, method="vbmf")
    print(report)

The decompositions need tensorly (imported only when a weight is decomposed); the ops
and modules work without it.
"""

from ._ops import tucker_conv2d, tucker_linear, use_reference
from .compress import CompressionReport, LayerReport, compress, fuse_sequential_chains, to_sequential_model
from .decompose import TuckerFactors, decompose_conv2d, decompose_linear, reconstruct_conv2d, reconstruct_linear
from .models import ThesisNet, thesis_ranks
from .modules import TuckerConv2d, TuckerLinear
from .ranks import METHODS, RankSpec, dense_params, energy_rank, evbmf, macs_for_ranks, params_for_ranks, select_ranks

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "LayerReport",
    "METHODS",
    "RankSpec",
    "ThesisNet",
    "TuckerConv2d",
    "TuckerFactors",
    "TuckerLinear",
    "compress",
    "decompose_conv2d",
    "decompose_linear",
    "dense_params",
    "energy_rank",
    "evbmf",
    "fuse_sequential_chains",
    "macs_for_ranks",
    "params_for_ranks",
    "reconstruct_conv2d",
    "reconstruct_linear",
    "select_ranks",
    "thesis_ranks",
    "to_sequential_model",
    "tucker_conv2d",
    "tucker_linear",
    "use_reference",
]
