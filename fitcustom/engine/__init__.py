"""The step engine: `TapeModel` and the types of its pieces.

`model` assembles `TapeModel` from one mixin per concern: `compiling`,
`fitting`, `pieces`, `custom_steps` (with `term_checks`), `ema`;
`transforms` holds the gradient transforms.

May import: the engine's own modules.
"""

from fitcustom.engine.model import TapeModel as TapeModel
from fitcustom.engine.model import check_saved_version as check_saved_version
from fitcustom.engine.pieces import Gradients as Gradients
from fitcustom.engine.pieces import Variables as Variables

__all__ = ["Gradients", "TapeModel", "Variables", "check_saved_version"]
