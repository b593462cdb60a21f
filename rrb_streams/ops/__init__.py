"""Running in production: metrics, the HTTP endpoints and readiness, the pipeline's status,
progress display and timed storage."""
