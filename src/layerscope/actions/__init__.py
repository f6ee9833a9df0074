"""Actions that act on a ScoreTable: pruning (and, later, other edits of a model)."""
