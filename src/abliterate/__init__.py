"""abliterate: measure refusal directions in a language model and ablate them.

The Python API is the objects the CLI composes: a `Workbench` (one loaded model, its prompt splits, judge and
baselines) with the stages' data types. The README's "Python API" section walks through it.
"""

from abliterate.version import __version__  # noqa: F401

from abliterate.core.arch import adapter_for  # noqa: E402
from abliterate.core.judges import get_judge  # noqa: E402
from abliterate.core.load import load_model  # noqa: E402
from abliterate.core.prompts import format_prompts, load_prompts  # noqa: E402
from abliterate.errors import UserError  # noqa: E402
from abliterate.measure.ablation import AblationParams, Kernel, ablate, bake, plan_edits  # noqa: E402
from abliterate.measure.directions import Directions, measure_directions  # noqa: E402
from abliterate.measure.evaluate import Metrics  # noqa: E402
from abliterate.measure.workbench import PromptSplits, Workbench  # noqa: E402

__all__ = [
    "AblationParams", "Directions", "Kernel", "Metrics", "PromptSplits", "UserError", "Workbench", "ablate",
    "adapter_for", "bake", "format_prompts", "get_judge", "load_model", "load_prompts", "measure_directions",
    "plan_edits",
]
