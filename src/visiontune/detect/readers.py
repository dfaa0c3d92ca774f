"""Format readers behind detect/data.py:read_boxes (being written)."""
