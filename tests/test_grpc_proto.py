"""The wire contract: committed stubs match the .proto files, and the messages carry what the contract promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")


from fedhet.v1 import service_pb2, tensor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["fedhet/v1/tensor.proto", "fedhet/v1/service.proto"]
GENERATED = [
    "fedhet/v1/tensor_pb2.py",
    "fedhet/v1/tensor_pb2.pyi",
    "fedhet/v1/service_pb2.py",
    "fedhet/v1/service_pb2.pyi",
    "fedhet/v1/service_pb2_grpc.py",
]
SERVICE = service_pb2.DESCRIPTOR.services_by_name["FederatedLearning"]


def _protoc(*args: str) -> None:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'proto'}", *args])
    assert code == 0, f"protoc {' '.join(args)} failed"


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    """Regenerate with grpcio-tools (the commands in fedhet/v1/__init__.py) and compare bytes."""
    protos = [str(ROOT / "proto" / p) for p in PROTOS]
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos)
    _protoc(f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / "fedhet/v1/service.proto"))
    for name in GENERATED:
        fresh = (tmp_path / name).read_bytes()
        committed = (ROOT / name).read_bytes()
        assert fresh == committed, f"{name} is stale: regenerate it (see fedhet/v1/__init__.py)"
    extra = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py*")} - set(GENERATED)
    assert not extra, f"protoc produced files that are not committed: {sorted(extra)}"


def test_committed_gencode_loads_under_protobuf_6_and_7() -> None:
    """The stubs carry protobuf 6 gencode: protobuf 7 runtimes load gencode of an older major, protobuf 6 runtimes
    refuse gencode of 7, and Flower (the ``flower`` extra) pins protobuf<7. Regenerating with a grpcio-tools that
    emits protobuf 7 gencode would split fedhet and Flower into two environments."""
    for name in ("fedhet/v1/tensor_pb2.py", "fedhet/v1/service_pb2.py"):
        header = (ROOT / name).read_text().splitlines()[4]
        assert header.startswith("# Protobuf Python Version: 6."), f"{name}: {header}"


def test_generated_modules_import_as_fedhet_v1() -> None:
    assert service_pb2.DESCRIPTOR.package == "fedhet.v1"
    assert "fedhet.v1.tensor_pb2" in sys.modules


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_request_names_its_client(method: str) -> None:
    request = SERVICE.methods_by_name[method].input_type
    if request.name == "ResultMessage":
        request = request.fields_by_name["header"].message_type
    assert "client_id" in request.fields_by_name


@pytest.mark.parametrize("message", ["TaskHeader", "ResultHeader", "HeartbeatRequest"])
def test_task_messages_carry_task_id_and_version(message: str) -> None:
    fields = service_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert {"task_id", "version"} <= set(fields)


def test_tensor_spec_describes_name_shape_dtype_encoding_and_future_layouts() -> None:
    spec = tensor_pb2.DESCRIPTOR.message_types_by_name["TensorSpec"]
    assert {"name", "shape", "dtype", "encoding", "byte_length", "quant", "sparse"} <= set(spec.fields_by_name)
    assert spec.fields_by_name["shape"].is_repeated
    encodings = set(tensor_pb2.Encoding.keys())
    assert {"ENCODING_FP32", "ENCODING_FP16", "ENCODING_BF16", "ENCODING_PACKED_INT", "ENCODING_SPARSE"} <= encodings
    quant = tensor_pb2.DESCRIPTOR.message_types_by_name["QuantLayout"].fields_by_name
    assert {"bits", "group_size", "scale_encoding", "has_zero_point"} <= set(quant)
    sparse = tensor_pb2.DESCRIPTOR.message_types_by_name["SparseLayout"].fields_by_name
    assert {"nnz", "bitmap", "index_dtype", "value_encoding"} <= set(sparse)


def test_payloads_travel_in_streams_of_chunks() -> None:
    upload = SERVICE.methods_by_name["UploadResult"]
    download = SERVICE.methods_by_name["GetTask"]
    assert upload.client_streaming and not upload.server_streaming
    assert download.server_streaming and not download.client_streaming
    for method in (upload, download):
        kinds = method.input_type if method.client_streaming else method.output_type
        assert kinds.fields_by_name["chunk"].message_type.full_name == "fedhet.v1.Chunk"
