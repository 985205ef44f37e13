"""Per-target schedule rules and shipped tuning databases (imported by attndsl.lowering)."""
