"""Orchestration below the CLI: runs, jobs, estimates, synchronisation."""
