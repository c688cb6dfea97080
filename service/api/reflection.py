"""Server reflection that serves our proto files with their comments, and only a listener's own.

The generated Python modules hold descriptors without source information, so
plain reflection answers ``grpcurl describe`` with bare types. The code
generator also writes ``appointments/descriptor_set.binpb`` (our files, with
comments); this pool view hands reflection those protos instead, and defers
to the default pool for everything else (well-known types, health,
reflection itself).

Reflection answers without credentials, and one process holds the
descriptors of both listeners' services. A pool is therefore scoped to the
services its listener serves and the files they import: on the partner
listener, ``describe appointments.internal.v1.ConsentService`` answers as for
a name that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """The subset of ``DescriptorPool`` that grpc reflection uses, with commented files.

    Only the files of ``services``, the ``files`` named (the error details a
    listener sends, which grpcurl looks up to print them) and those they
    import, directly or not, are found; any other name raises ``KeyError``,
    which reflection answers as NOT_FOUND.
    """

    def __init__(
        self,
        documented: Mapping[str, descriptor_pb2.FileDescriptorProto],
        services: Iterable[str],
        files: Iterable[str] = (),
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.documented = dict(documented)
        self._pool = pool or descriptor_pool.Default()
        self._files: set[str] = set()
        waiting = [self._pool.FindServiceByName(name).file for name in services]
        waiting += [self._pool.FindFileByName(name) for name in files]
        while waiting:
            file = waiting.pop()
            if file.name not in self._files:
                self._files.add(file.name)
                waiting.extend(file.dependencies)

    def _in_scope(self, descriptor: Any) -> bool:
        """Whether ``descriptor`` (a file, or anything defined in one) belongs to a served file."""
        return getattr(descriptor, "file", descriptor).name in self._files

    def _served(self, descriptor: Any, name: str) -> Any:
        if not self._in_scope(descriptor):
            raise KeyError(name)
        return descriptor

    def FindFileByName(self, name: str) -> _File:
        return _File(self, self._served(self._pool.FindFileByName(name), name))

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        return _File(self, self._served(self._pool.FindFileContainingSymbol(symbol), symbol))

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._served(self._pool.FindMessageTypeByName(name), name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        self._served(message, message.full_name)
        return self._served(self._pool.FindExtensionByNumber(message, number), str(number))

    def FindAllExtensions(self, message: Any) -> Any:
        self._served(message, message.full_name)
        return [extension for extension in self._pool.FindAllExtensions(message) if self._in_scope(extension)]
