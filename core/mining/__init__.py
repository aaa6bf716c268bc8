"""Hard pair mining (HELIP section 1): top-k pairs by cos_t * cos_v, exact or fast, and the mined table's file.

Modules: `scores` (the filtered score, the tie rule, the table type), `exact`, `fast`, `table`
(hard_pairs.parquet). Callers import the public names from here.
"""

from core.mining.exact import mine_exact
from core.mining.fast import mine_fast
from core.mining.scores import MinedPairs
from core.mining.table import read_hard_pairs, write_hard_pairs

__all__ = ["MinedPairs", "mine_exact", "mine_fast", "read_hard_pairs", "write_hard_pairs"]
