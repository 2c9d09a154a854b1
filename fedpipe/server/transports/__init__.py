"""One module or package per transport between the round loop and its clients: ``inprocess``
(clients in this process), ``grpc`` (client processes over the network), ``dask`` (clients
on a Dask cluster's workers)."""
