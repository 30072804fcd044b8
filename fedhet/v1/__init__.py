"""The fedhet wire contract, version 1: stubs generated from ``proto/fedhet/v1/*.proto`` and the tensor codec
that moves weights through them (:mod:`fedhet.v1.wire`).

Only the gRPC server (``fedhet.server``) and the client's network loop (``fedhet.clients.network``) import this
package. Regenerate the stubs after editing a ``.proto`` file (``tests/test_grpc_proto.py`` fails on drift), with
grpcio-tools 1.81.1 (the dev extra's pin: the last release that emits protobuf 6 gencode, which Flower needs)::

    python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
        proto/fedhet/v1/tensor.proto proto/fedhet/v1/service.proto
    python -m grpc_tools.protoc -Iproto --grpc_python_out=. proto/fedhet/v1/service.proto
"""
