"""The VLM families the zoo builds, one file each; importing a family's file registers its ``Builder``.

To add a family, write its file (ending in a ``register`` call) and import it below.
"""

# Each import registers its family; this order (not sorted) is FAMILIES' order.
from tokred.zoo.families import llava, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl  # noqa: F401, I001
from tokred.zoo.families.base import BUILDERS, Builder

__all__ = ["BUILDERS", "Builder"]
