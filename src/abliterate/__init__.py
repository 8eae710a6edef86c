"""abliterate: measure refusal directions in a language model and ablate them.

The Python API is the same set of objects the CLI uses:

    from abliterate import load_model, load_prompts, measure_directions, AblationParams, ablate, bake
"""

__version__ = "0.1.0"

from abliterate.measure.ablation import AblationParams, Kernel, ablate, bake, plan_edits  # noqa: E402
from abliterate.core.arch import adapter_for  # noqa: E402
from abliterate.measure.directions import Directions, measure_directions  # noqa: E402
from abliterate.errors import UserError  # noqa: E402
from abliterate.core.load import load_model  # noqa: E402
from abliterate.core.prompts import format_prompts, load_prompts  # noqa: E402

__all__ = [
    "AblationParams", "Directions", "Kernel", "UserError", "ablate", "adapter_for", "bake",
    "format_prompts", "load_model", "load_prompts", "measure_directions", "plan_edits",
]
