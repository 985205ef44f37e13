"""The passes, one per module; `attndsl.pipeline` lists them in order."""
