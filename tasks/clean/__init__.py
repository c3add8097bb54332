"""Stage 1, clean, in rooms of one purpose each:

- stage.py: the stage itself, `clean(data, ctx)`: splits, duplicates, accounting for every row
- readers.py: sources read row by row (files, folders, saved datasets, builtin sets)
- normalise.py: a raw row to the clean shape, or its reject reason
- dedup.py: near-duplicate signatures (MinHash LSH)
- report.py: rejects, report.json, label counts and hints
"""

from tasks.clean.dedup import GRAM_MIX, NearDuplicates
from tasks.clean.readers import DataError, check_readable, check_source
from tasks.clean.stage import clean, in_eval_split

__all__ = ["GRAM_MIX", "DataError", "NearDuplicates", "check_readable", "check_source", "clean", "in_eval_split"]
