"""One package per transport between the round loop and its clients: ``grpc`` (separate
processes over the network), ``dask`` (a Dask cluster); the in-process one is
:mod:`fedpipe.server.inprocess`."""
