"""rescompile's rewrite passes: the name -> class table used by the CLI and API.

No import-time registration: a pass is available when it is listed here.
"""

from .identity import IdentityPass
from .rezero import RezeroPass

__all__ = ["PASSES", "DEFAULT_PIPELINE", "IdentityPass", "RezeroPass"]

PASSES = {
    IdentityPass.name: IdentityPass,
    RezeroPass.name: RezeroPass,
}

DEFAULT_PIPELINE: tuple[str, ...] = ()
