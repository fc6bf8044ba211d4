"""How commands reach a machine: SSH through RunPod's proxy (PTY), direct SSH, or this machine."""
