"""``rrb-verify``: the proof that storage matches the source, and its report."""
