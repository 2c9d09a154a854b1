"""The gRPC transport: the server process (:mod:`.server`), the ``Session`` stream
(:mod:`.session`), the client proxy (:mod:`.proxy`), who is admitted (:mod:`.admission`)
and how many reply bytes are received at once (:mod:`.receive_budget`).

Everything that names gRPC on the server lives here; the protocol's records and framing are
in :mod:`fedpipe.common`, which no other transport needs gRPC to import.
"""
