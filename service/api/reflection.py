"""Server reflection that serves our proto files with their comments.

The generated Python modules hold descriptors without source information, so
plain reflection answers ``grpcurl describe`` with bare types. The code
generator also writes ``appointments/descriptor_set.binpb`` (our files, with
comments); this pool view hands reflection those protos instead, and defers
to the default pool for everything else (well-known types, health,
reflection itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

DESCRIPTOR_SET = "descriptor_set.binpb"


def documented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Our file protos with source info, by file name (empty if the generated set is missing)."""
    try:
        raw = resources.files("appointments").joinpath(DESCRIPTOR_SET).read_bytes()
    except FileNotFoundError:
        return {}
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(raw).file}


class _File:
    """A file descriptor whose ``CopyToProto`` keeps the comments."""

    def __init__(self, pool: DocumentedPool, descriptor: Any) -> None:
        self._pool = pool
        self._descriptor = descriptor
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(self._pool, dependency) for dependency in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._pool.documented.get(self.name)
        if documented is not None:
            proto.CopyFrom(documented)
        else:
            self._descriptor.CopyToProto(proto)


class DocumentedPool:
    """The subset of ``DescriptorPool`` that grpc reflection uses, with commented files."""

    def __init__(
        self,
        documented: Mapping[str, descriptor_pb2.FileDescriptorProto],
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.documented = dict(documented)
        self._pool = pool or descriptor_pool.Default()

    def FindFileByName(self, name: str) -> _File:
        return _File(self, self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        return _File(self, self._pool.FindFileContainingSymbol(symbol))

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return self._pool.FindAllExtensions(message)
