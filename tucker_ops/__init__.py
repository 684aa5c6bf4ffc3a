"""tucker-ops: Tucker-decomposed Conv2d and Linear layers, run by fused torch ops.

Typical use::

    import tucker_ops
    model, report = tucker_ops.compress(model, method="vbmf")
    print(report)

The decompositions need tensorly (imported only when a weight is decomposed); the ops
and modules work without it.
"""

from . import flops  # noqa: F401  (registers the ops' FlopCounterMode formulas)
from ._ops import keep_intermediates, tucker_conv2d, tucker_linear, use_reference
from ._epilogue_op import tucker_conv2d_relu_pool
from .epilogues import TuckerConv2dReLUPool, fuse_epilogues
from .compress import CompressionReport, LayerReport, compress, fuse_sequential_chains, to_sequential_model
from .decompose import TuckerFactors, decompose_conv2d, decompose_linear, reconstruct_conv2d, reconstruct_linear
from .models import ThesisNet, thesis_ranks
from .projection import TuckerProjection
from .modules import TuckerConv2d, TuckerLinear
from .ranks import METHODS, RankSpec, dense_params, energy_rank, evbmf, macs_for_ranks, params_for_ranks, select_ranks
from .serialization import CHECKPOINT_FORMAT_VERSION, Checkpoint, CheckpointError, apply_compression_plan, compression_plan, load, save

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CompressionReport",
    "LayerReport",
    "METHODS",
    "RankSpec",
    "ThesisNet",
    "TuckerConv2d",
    "TuckerConv2dReLUPool",
    "TuckerFactors",
    "TuckerLinear",
    "TuckerProjection",
    "apply_compression_plan",
    "compress",
    "compression_plan",
    "decompose_conv2d",
    "decompose_linear",
    "dense_params",
    "energy_rank",
    "evbmf",
    "fuse_epilogues",
    "fuse_sequential_chains",
    "keep_intermediates",
    "load",
    "macs_for_ranks",
    "params_for_ranks",
    "reconstruct_conv2d",
    "reconstruct_linear",
    "save",
    "select_ranks",
    "thesis_ranks",
    "to_sequential_model",
    "tucker_conv2d",
    "tucker_conv2d_relu_pool",
    "tucker_linear",
    "use_reference",
]
