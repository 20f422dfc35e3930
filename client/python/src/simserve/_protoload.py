"""Message classes and gRPC stubs built at import time from a serialized FileDescriptorSet.

protoc's Python gencode (`*_pb2.py`, `*_pb2_grpc.py`) is tied to the protobuf / grpcio
versions that generated it: since protobuf 5.26 it refuses older runtimes
(`runtime_version.ValidateProtobufRuntimeVersion`), and grpcio-tools' stubs check
`GRPC_GENERATED_VERSION`. A FileDescriptorSet is plain data that every runtime reads. So the
build (setup.py) only asks protoc for the descriptor set of the proto, and the modules in
`simserve.v1` build their classes here with the runtime's own public API:
`descriptor_pool.DescriptorPool`, `message_factory.GetMessageClass` (protobuf >= 4.22) or
`MessageFactory.GetPrototype` (older), and grpcio's `channel.unary_unary` & co. /
`grpc.method_handlers_generic_handler` for the stub and servicer.

The files go into a private DescriptorPool of their own, never into protobuf's default pool:
they cannot clash with anything another package registers there (tritonclient's `inference`
protos, a second copy of similarity.proto compiled by someone else), and importing simserve
changes nothing for other packages. Consequence: `descriptor_pool.Default()` /
`symbol_database` do not know the simserve types; use the classes (or their DESCRIPTOR).
"""

from __future__ import annotations

import pkgutil
from typing import Any, Callable, Dict, List, MutableMapping, NamedTuple, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# What gencode uses for enums (Name / Value / keys / items); there since protobuf 3.0.
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


class ProtoFile(NamedTuple):
    """One .proto file loaded into a private pool."""

    descriptor: Any                      # its FileDescriptor
    proto: descriptor_pb2.FileDescriptorProto
    classes: Dict[str, type]             # message full name -> class (nested ones too)


def _message_class(descriptor: Any, factory: Any) -> type:
    get = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    if get is not None:
        return get(descriptor)
    return factory.GetPrototype(descriptor)  # 4.21 (removed in 5.x, where the above exists)


def _set_name(cls: type, module: str, qualname: str) -> None:
    # As gencode does (module name for repr / pickle); harmless where a runtime refuses.
    for attr, value in (("__module__", module), ("__qualname__", qualname)):
        try:
            setattr(cls, attr, value)
        except (AttributeError, TypeError):
            pass


def _build_message(descriptor: Any, factory: Any, module: str, qualname: str,
                   classes: Dict[str, type]) -> type:
    cls = _message_class(descriptor, factory)
    _set_name(cls, module, qualname)
    classes[descriptor.full_name] = cls
    for nested in descriptor.nested_types:
        sub = _build_message(nested, factory, module, f"{qualname}.{nested.name}", classes)
        if getattr(cls, nested.name, None) is not sub:
            try:  # the pure-Python runtime does not attach nested classes by itself
                setattr(cls, nested.name, sub)
            except (AttributeError, TypeError):
                pass
    return cls


def load(package: str, resource: str, proto_name: str, namespace: MutableMapping[str, Any],
         module: str) -> ProtoFile:
    """Loads the FileDescriptorSet `resource` of `package` into a new private pool and fills
    `namespace` (a module's globals) like protoc's gencode for `proto_name`: DESCRIPTOR,
    each top-level enum (an EnumTypeWrapper) and its values, each top-level message class."""
    data = pkgutil.get_data(package, resource)
    if data is None:
        raise ImportError(f"{package}/{resource} is missing: the package was not built "
                          f"(setup.py writes it from {proto_name})")
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    proto = None
    for f in fds.file:  # dependencies first (protoc --include_imports orders them so)
        pool.AddSerializedFile(f.SerializeToString())
        if f.name == proto_name:
            proto = f
    if proto is None:
        raise ImportError(f"{package}/{resource} does not describe {proto_name}")
    file_desc = pool.FindFileByName(proto_name)
    factory = None if hasattr(message_factory, "GetMessageClass") else \
        message_factory.MessageFactory(pool)
    namespace["DESCRIPTOR"] = file_desc
    for name, enum in file_desc.enum_types_by_name.items():
        namespace[name] = EnumTypeWrapper(enum)
        for value in enum.values:
            namespace[value.name] = value.number
    classes: Dict[str, type] = {}
    for name, msg in file_desc.message_types_by_name.items():
        namespace[name] = _build_message(msg, factory, module, name, classes)
    return ProtoFile(file_desc, proto, classes)


class Method(NamedTuple):
    name: str
    path: str                # "/package.Service/Method"
    kind: str                # unary_unary | unary_stream | stream_unary | stream_stream
    request: type
    response: type


def methods(pf: ProtoFile, service: str) -> List[Method]:
    """The RPCs of `service` (its short name) in declaration order."""
    for svc in pf.proto.service:
        if svc.name == service:
            break
    else:
        raise ImportError(f"{pf.proto.name} has no service {service}")
    full = f"{pf.proto.package}.{service}" if pf.proto.package else service
    out = []
    for m in svc.method:
        kind = ("stream" if m.client_streaming else "unary") + "_" + \
               ("stream" if m.server_streaming else "unary")
        out.append(Method(m.name, f"/{full}/{m.name}", kind, pf.classes[m.input_type[1:]],
                          pf.classes[m.output_type[1:]]))
    return out


def _multicallable(channel: Any, m: Method) -> Any:
    factory = getattr(channel, m.kind)
    kwargs = dict(request_serializer=m.request.SerializeToString,
                  response_deserializer=m.response.FromString)
    try:  # what newer grpcio-tools stubs pass; older grpcio (e.g. 1.51) lacks the keyword
        return factory(m.path, _registered_method=True, **kwargs)
    except TypeError:
        return factory(m.path, **kwargs)


def service(pf: ProtoFile, name: str, module: str) -> Tuple[type, type, Callable]:
    """(NameStub, NameServicer, add_NameServicer_to_server) as grpcio-tools generates them,
    for the sync and the asyncio (grpc.aio) API alike."""
    import grpc  # only the stub module needs grpcio

    rpcs = methods(pf, name)
    full = rpcs[0].path.split("/")[1] if rpcs else name

    def stub_init(self: Any, channel: Any) -> None:
        for m in rpcs:
            setattr(self, m.name, _multicallable(channel, m))

    stub = type(f"{name}Stub", (object,), {
        "__init__": stub_init, "__module__": module,
        "__doc__": f"Client stub of {full}: one attribute per RPC."})

    def unimplemented(self: Any, request: Any, context: Any) -> Any:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    servicer = type(f"{name}Servicer", (object,), dict(
        {m.name: unimplemented for m in rpcs}, __module__=module,
        __doc__=f"Base class of a {full} implementation: override the RPCs."))

    def add_to_server(impl: Any, server: Any) -> None:
        handlers = {
            m.name: getattr(grpc, f"{m.kind}_rpc_method_handler")(
                getattr(impl, m.name), request_deserializer=m.request.FromString,
                response_serializer=m.response.SerializeToString)
            for m in rpcs}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full, handlers),))
        if hasattr(server, "add_registered_method_handlers"):  # newer grpcio only
            server.add_registered_method_handlers(full, handlers)

    add_to_server.__name__ = f"add_{name}Servicer_to_server"
    add_to_server.__module__ = module
    return stub, servicer, add_to_server
