"""rescompile's rewrite passes: the name -> class table used by the CLI and API.

No import-time registration: a pass is available when it is listed here.
"""

from .compress import CompressPass
from .decay import DecayPass
from .deepnorm import DeepNormPass
from .dense import DenseFormerPass
from .depthscale import DepthScalePass
from .drop import DropPass
from .fold import FoldPass
from .frac import FracConnectionsPass
from .fuse import FusePass
from .gate import GatePass
from .hyper import HyperConnectionsPass
from .identity import IdentityPass
from .ladder import LadderPass
from .laurel import LaurelPass
from .layerscale import LayerScalePass
from .loop import LoopPass
from .macaron import MacaronPass
from .parallel import ParallelPass
from .prune import PrunePass
from .rezero import RezeroPass
from .rk2 import RK2Pass
from .shallow import ShallowPass

__all__ = [
    "PASSES",
    "DEFAULT_PIPELINE",
    "IdentityPass",
    "RezeroPass",
    "LayerScalePass",
    "LaurelPass",
    "GatePass",
    "HyperConnectionsPass",
    "FracConnectionsPass",
    "DenseFormerPass",
    "DecayPass",
    "DeepNormPass",
    "DepthScalePass",
    "FoldPass",
    "DropPass",
    "CompressPass",
    "ParallelPass",
    "ShallowPass",
    "LadderPass",
    "RK2Pass",
    "PrunePass",
    "MacaronPass",
    "LoopPass",
    "FusePass",
]

PASSES = {
    cls.name: cls
    for cls in (
        IdentityPass,
        RezeroPass,
        LayerScalePass,
        LaurelPass,
        GatePass,
        HyperConnectionsPass,
        FracConnectionsPass,
        DenseFormerPass,
        DecayPass,
        DeepNormPass,
        DepthScalePass,
        FoldPass,
        DropPass,
        CompressPass,
        ParallelPass,
        ShallowPass,
        LadderPass,
        RK2Pass,
        PrunePass,
        MacaronPass,
        LoopPass,
        FusePass,
    )
}

DEFAULT_PIPELINE: tuple[str, ...] = ()
