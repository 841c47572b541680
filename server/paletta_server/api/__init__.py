"""gRPC servicers: thin translation between proto and the job manager; errors mapped in errors.py."""
