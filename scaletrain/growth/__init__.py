"""Function-preserving growth of Llama-style models, on plain state dicts (HF key names).

`plan` validates shapes and yields per-tensor recipes; `width` and `depth` hold the index maps;
`optimizer_state` maps Adam moments with the same maps.
"""

from scaletrain.growth.plan import GrowthPlan, GrowthSpec, Recipe, grow_state_dict, validate

__all__ = ["GrowthPlan", "GrowthSpec", "Recipe", "grow_state_dict", "validate"]
