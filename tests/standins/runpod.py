"""pytest fixtures for the RunPod emulator (placeholder until the emulator is written)."""
