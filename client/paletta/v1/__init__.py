"""Generated gRPC stubs for the paletta.v1 contracts (built from proto/ at install time)."""
