"""Code generated from ``protos/`` (package ``fedpipe.v1``); regenerate with ``make protos``.

Import generated modules by their full path, e.g.
``from fedpipe.proto.fedpipe.v1 import tensor_pb2 as pb``. Do not edit them by hand: the test
``tests/test_protos_up_to_date.py`` checks they match ``python -m fedpipe.proto.generate``.
"""
