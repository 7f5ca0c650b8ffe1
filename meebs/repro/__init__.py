"""`reproduce` and `record`: rerun a run from its manifest and say what reproduced."""
