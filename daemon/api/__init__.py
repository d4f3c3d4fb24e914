"""The HTTP API: the daemon's server, the router, the route tables per area, OpenAPI."""
