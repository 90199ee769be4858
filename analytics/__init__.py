"""callgate's read side: pure folds, projections rebuilt from the event log, Datasette wiring."""
