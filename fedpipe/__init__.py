"""fedpipe: federated learning with pipelines of stateful optimizer modules, over gRPC."""

__version__ = "0.1.0"
