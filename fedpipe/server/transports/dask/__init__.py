"""``transport = "dask"``: simulated clients on Dask distributed workers (the ``dask`` extra).

:mod:`.run` starts or joins the cluster and runs the round loop, :mod:`.proxy` is the server
side (client proxies, placement, one call per worker and phase to its Dask actor),
:mod:`.worker` the worker side (each worker's model object and clients, its actor),
:mod:`.payloads` what crosses between them.
Nothing here is imported unless a simulation asks for this transport.
"""
