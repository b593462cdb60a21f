"""rrb-streams: real-time backup of Redis to object storage through a durable Redis Stream."""

__version__ = "0.1.0"
