# Rewards → filters → advantages (spec §3.3–§3.5). Explicit re-exports so other modules can append their own.
from lrl.algorithms.advantages import collapse_ratio as collapse_ratio
from lrl.algorithms.advantages import compute_advantages as compute_advantages
from lrl.algorithms.filters import FilterResult as FilterResult
from lrl.algorithms.filters import filter_groups as filter_groups
from lrl.algorithms.reward_shaping import accuracy_reward as accuracy_reward
from lrl.algorithms.reward_shaping import apply_length_penalty as apply_length_penalty
from lrl.algorithms.reward_shaping import group_normalize as group_normalize
