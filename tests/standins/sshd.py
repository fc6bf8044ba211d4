"""pytest fixtures for the sshd pod (placeholder until it is written)."""
