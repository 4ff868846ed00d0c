"""Ways of running attention across the mesh; one file each, one signature (see base.py)."""
