"""Import-only stand-in for lm_eval.models: benchmark only, never used in a run (see lm_eval)."""
