"""The router tournament: every router trained under identical conditions (data, batches,
seeds, active parameters), one table and four plots. `python -m moe_py tournament`."""
from .entries import ENTRIES, ENTRY_NAMES, Entry, available_entries, entry_configs
from .run import DEFAULT_SEEDS, DEFAULT_STEPS, TUNE_SEED, run_tournament, write_table

__all__ = ["ENTRIES", "ENTRY_NAMES", "Entry", "available_entries", "entry_configs", "DEFAULT_SEEDS",
           "DEFAULT_STEPS", "TUNE_SEED", "run_tournament", "write_table"]
