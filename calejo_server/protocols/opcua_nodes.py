"""The adapter's nodes, built straight into asyncua's address space.

asyncua's AddNodes service gives every attribute of every node objects of
its own: about 6 KB for one variable, so 10,000 pumps (90,000 nodes) would
take over half a gigabyte and half a minute with the event loop blocked.
The adapter's nodes come in a few kinds that differ only in their node id
and value, so this module builds them as asyncua ``NodeData`` directly:

- the attributes that every variable of a kind has alike (data type,
  access level, names, description) are one set of objects, shared;
- each node owns its Value and, made on first read, its NodeId attribute;
- the children of one parent share the list of their references (up to
  the parent, to their type definition); the parent holds one forward
  reference per child, as asyncua does.

Sharing is safe because nothing writes those attributes or references:
clients may not write, add or delete anything (:mod:`opcua_access`), and
the adapter writes only Values. What asyncua reads (attributes, references,
data-change callbacks on the Value) behaves as with its own nodes; the
OPC UA tests browse, read and subscribe to these nodes with a real client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Final

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from calejo_server.protocols.opcua_access import numeric_node_id, status

_NODE_ID: Final = AttributeIds.NodeId
_VALUE: Final = AttributeIds.Value

HAS_COMPONENT: Final = numeric_node_id(ObjectIds.HasComponent)
ORGANIZES: Final = numeric_node_id(ObjectIds.Organizes)
HAS_TYPE_DEFINITION: Final = numeric_node_id(ObjectIds.HasTypeDefinition)
FOLDER_TYPE: Final = numeric_node_id(ObjectIds.FolderType)
OBJECT_TYPE: Final = numeric_node_id(ObjectIds.BaseObjectType)
VARIABLE_TYPE: Final = numeric_node_id(ObjectIds.BaseDataVariableType)

DATA_TYPES: Final[Mapping[ua.VariantType, ua.NodeId]] = {
    ua.VariantType.Boolean: numeric_node_id(ObjectIds.Boolean),
    ua.VariantType.UInt16: numeric_node_id(ObjectIds.UInt16),
    ua.VariantType.UInt32: numeric_node_id(ObjectIds.UInt32),
    ua.VariantType.Double: numeric_node_id(ObjectIds.Double),
    ua.VariantType.String: numeric_node_id(ObjectIds.String),
}
"""The variant types the adapter's variables hold, to their data types."""

NO_DATA: Final = status(StatusCodes.BadWaitingForInitialData)


def _constant(value: object, kind: ua.VariantType) -> AttributeValue:
    return AttributeValue(ua.DataValue(ua.Variant(value, kind)))


class Attributes(MutableMapping[int, AttributeValue]):
    """The attributes of one node: shared ones, its own Value and NodeId.

    Keys are attribute ids; asyncua passes them as ``AttributeIds`` or
    as the plain integers that arrive in requests, which compare equal.
    """

    __slots__ = ("_node_id", "_own", "_shared", "_value")

    def __init__(
        self,
        node_id: ua.NodeId,
        shared: Mapping[int, AttributeValue],
        value: AttributeValue | None = None,
    ) -> None:
        self._node_id = node_id
        self._shared = shared
        self._value = value
        self._own: dict[int, AttributeValue] | None = None

    def __getitem__(self, key: int) -> AttributeValue:
        if key == _VALUE and self._value is not None:
            return self._value
        own = self._own
        if own is not None and key in own:
            return own[key]
        if key == _NODE_ID:
            attribute = _constant(self._node_id, ua.VariantType.NodeId)
            self._keep(key, attribute)
            return attribute
        return self._shared[key]

    def __contains__(self, key: object) -> bool:
        if key == _NODE_ID or (key == _VALUE and self._value is not None):
            return True
        own = self._own
        return (own is not None and key in own) or key in self._shared

    def __setitem__(self, key: int, attribute: AttributeValue) -> None:
        if key == _VALUE:
            self._value = attribute
        else:
            self._keep(key, attribute)

    def __delitem__(self, key: int) -> None:
        if key == _VALUE and self._value is not None:
            self._value = None
            return
        own = self._own
        if own is None or key not in own:
            raise KeyError(key)
        del own[key]

    def __iter__(self) -> Iterator[int]:
        own = self._own or {}
        yield _NODE_ID
        for key in self._shared:
            if key not in own:
                yield key
        for key in own:
            if key != _NODE_ID:
                yield key
        if self._value is not None:
            yield _VALUE

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _keep(self, key: int, attribute: AttributeValue) -> None:
        if self._own is None:
            self._own = {}
        self._own[key] = attribute


class Variable:
    """One variable the adapter writes: its node, Value and last value."""

    __slots__ = ("attribute", "kind", "last", "node_id")

    def __init__(
        self, node_id: ua.NodeId, attribute: AttributeValue, kind: ua.VariantType
    ) -> None:
        self.node_id = node_id
        self.attribute = attribute
        self.kind = kind
        self.last: object = _UNSET


_UNSET: Final = object()


class Values:
    """Data values made for one round of writes, shared by equal values.

    Every value of a round gets the same timestamps; nodes that receive an
    equal value share one DataValue, which asyncua never changes in place.
    """

    __slots__ = ("_made", "now")

    def __init__(self, now: dt.datetime | None = None) -> None:
        self.now: Any = now if now is not None else dt.datetime.now(dt.UTC)
        self._made: dict[tuple[ua.VariantType, object], ua.DataValue] = {}

    def get(self, value: object, kind: ua.VariantType) -> ua.DataValue:
        key = (kind, value)
        made = self._made.get(key)
        if made is not None:
            return made

        now = self.now
        if value is None:
            made = ua.DataValue(
                StatusCode=NO_DATA, SourceTimestamp=now, ServerTimestamp=now
            )
        else:
            made = ua.DataValue(
                ua.Variant(value, kind), SourceTimestamp=now, ServerTimestamp=now
            )
        self._made[key] = made
        return made


async def write(
    aspace: AddressSpace, variable: Variable, value: object, values: Values
) -> int:
    """Give ``variable`` ``value`` unless it holds it already; 1 if written.

    A node without monitored items gets the value assigned; one with them
    goes through asyncua's write, which notifies its subscriptions.
    """
    if variable.last == value and type(variable.last) is type(value):
        return 0

    data = values.get(value, variable.kind)
    attribute = variable.attribute
    if attribute.datachange_callbacks:
        result = await aspace.write_attribute_value(variable.node_id, _VALUE, data)
        if not result.is_good():
            raise ValueError(
                f"writing {variable.node_id.to_string()} failed: {result.name}"
            )
    else:
        attribute.value = data
    variable.last = value
    return 1


class Builder:
    """Makes the adapter's objects and variables in one address space."""

    def __init__(self, aspace: AddressSpace, namespace: int) -> None:
        self.aspace = aspace
        self.namespace = namespace
        self._names: dict[str, tuple[ua.QualifiedName, ua.LocalizedText]] = {}
        self._kinds: dict[
            tuple[str, ua.VariantType, str], dict[int, AttributeValue]
        ] = {}
        self._objects: dict[tuple[str, str], dict[int, AttributeValue]] = {}
        self._type_refs: dict[ua.NodeId, ua.ReferenceDescription] = {}
        self._initial: dict[tuple[ua.VariantType, object], ua.DataValue] = {}

    def node_id(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self.namespace)  # type: ignore[arg-type]

    def folder(
        self, parent: ua.NodeId, path: str, name: str, description: str = ""
    ) -> ua.NodeId:
        """A FolderType object under ``parent``."""
        return self._object(parent, path, name, description, FOLDER_TYPE)

    def object(
        self, parent: ua.NodeId, path: str, name: str, description: str = ""
    ) -> ua.NodeId:
        """A BaseObjectType object under ``parent``."""
        return self._object(parent, path, name, description, OBJECT_TYPE)

    def variables(
        self,
        parent: ua.NodeId,
        base: str,
        specs: Sequence[tuple[str, ua.VariantType, str]],
    ) -> dict[str, Variable]:
        """Read-only scalar variables ``base/<name>`` of ``parent``.

        ``specs`` holds (name, variant type, description); each variable
        starts without a value (BadWaitingForInitialData) until written.
        """
        parent_data = self.aspace[parent]
        shared_refs = [
            self._reference_to(parent, HAS_COMPONENT, forward=False),
            self._type_reference(VARIABLE_TYPE),
        ]

        made: dict[str, Variable] = {}
        for name, kind, description in specs:
            node_id = self.node_id(f"{base}/{name}")
            value = AttributeValue(self._initial_value(kind))
            data = NodeData(node_id)
            data.attributes = Attributes(  # type: ignore[assignment]
                node_id, self._variable_kind(name, kind, description), value
            )
            data.references = shared_refs
            self._add(node_id, data)

            qualified, display = self._name(name)
            parent_data.references.append(
                ua.ReferenceDescription(
                    ReferenceTypeId=HAS_COMPONENT,
                    IsForward=True,
                    NodeId=node_id,
                    BrowseName=qualified,
                    DisplayName=display,
                    NodeClass=ua.NodeClass.Variable,
                    TypeDefinition=VARIABLE_TYPE,
                )
            )
            made[name] = Variable(node_id, value, kind)
        return made

    def _object(
        self,
        parent: ua.NodeId,
        path: str,
        name: str,
        description: str,
        type_id: ua.NodeId,
    ) -> ua.NodeId:
        parent_data = self.aspace[parent]
        parent_type = _type_of(parent_data)
        reference = ORGANIZES if parent_type == FOLDER_TYPE else HAS_COMPONENT

        node_id = self.node_id(path)
        data = NodeData(node_id)
        data.attributes = Attributes(  # type: ignore[assignment]
            node_id, self._object_kind(name, description)
        )
        data.references = [
            self._reference_to(parent, reference, forward=False),
            self._type_reference(type_id),
        ]
        self._add(node_id, data)

        qualified, display = self._name(name)
        parent_data.references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=reference,
                IsForward=True,
                NodeId=node_id,
                BrowseName=qualified,
                DisplayName=display,
                NodeClass=ua.NodeClass.Object,
                TypeDefinition=type_id,
            )
        )
        return node_id

    def _add(self, node_id: ua.NodeId, data: NodeData) -> None:
        if node_id in self.aspace:
            raise ValueError(f"node {node_id.to_string()} exists already")
        self.aspace[node_id] = data

    def _name(self, name: str) -> tuple[ua.QualifiedName, ua.LocalizedText]:
        names = self._names.get(name)
        if names is None:
            names = (ua.QualifiedName(name, self.namespace), ua.LocalizedText(name))
            self._names[name] = names
        return names

    def _object_kind(self, name: str, description: str) -> dict[int, AttributeValue]:
        key = (name, description)
        shared = self._objects.get(key)
        if shared is not None:
            return shared

        qualified, display = self._name(name)
        shared = {
            AttributeIds.NodeClass: _constant(
                ua.NodeClass.Object, ua.VariantType.Int32
            ),
            AttributeIds.BrowseName: _constant(qualified, ua.VariantType.QualifiedName),
            AttributeIds.DisplayName: _constant(display, ua.VariantType.LocalizedText),
            AttributeIds.Description: _constant(
                ua.LocalizedText(description or name), ua.VariantType.LocalizedText
            ),
            AttributeIds.WriteMask: _constant(0, ua.VariantType.UInt32),
            AttributeIds.UserWriteMask: _constant(0, ua.VariantType.UInt32),
            AttributeIds.EventNotifier: _constant(0, ua.VariantType.Byte),
        }
        self._objects[key] = shared
        return shared

    def _variable_kind(
        self, name: str, kind: ua.VariantType, description: str
    ) -> dict[int, AttributeValue]:
        key = (name, kind, description)
        shared = self._kinds.get(key)
        if shared is not None:
            return shared

        qualified, display = self._name(name)
        read_only = ua.AccessLevel.CurrentRead.mask
        shared = {
            AttributeIds.NodeClass: _constant(
                ua.NodeClass.Variable, ua.VariantType.Int32
            ),
            AttributeIds.BrowseName: _constant(qualified, ua.VariantType.QualifiedName),
            AttributeIds.DisplayName: _constant(display, ua.VariantType.LocalizedText),
            AttributeIds.Description: _constant(
                ua.LocalizedText(description), ua.VariantType.LocalizedText
            ),
            AttributeIds.WriteMask: _constant(0, ua.VariantType.UInt32),
            AttributeIds.UserWriteMask: _constant(0, ua.VariantType.UInt32),
            AttributeIds.DataType: _constant(DATA_TYPES[kind], ua.VariantType.NodeId),
            AttributeIds.ValueRank: _constant(
                int(ua.ValueRank.Scalar), ua.VariantType.Int32
            ),
            AttributeIds.ArrayDimensions: AttributeValue(
                ua.DataValue(ua.Variant(None, ua.VariantType.UInt32, is_array=True))
            ),
            AttributeIds.AccessLevel: _constant(read_only, ua.VariantType.Byte),
            AttributeIds.UserAccessLevel: _constant(read_only, ua.VariantType.Byte),
            AttributeIds.MinimumSamplingInterval: _constant(0.0, ua.VariantType.Double),
            AttributeIds.Historizing: _constant(False, ua.VariantType.Boolean),
        }
        self._kinds[key] = shared
        return shared

    def _initial_value(self, kind: ua.VariantType) -> ua.DataValue:
        made = self._initial.get((kind, None))
        if made is None:
            made = ua.DataValue(StatusCode=NO_DATA)
            self._initial[(kind, None)] = made
        return made

    def _reference_to(
        self, target: ua.NodeId, reference: ua.NodeId, *, forward: bool
    ) -> ua.ReferenceDescription:
        data = self.aspace[target]
        attributes = data.attributes
        node_class = attributes[AttributeIds.NodeClass].value
        browse_name = attributes[AttributeIds.BrowseName].value
        display_name = attributes[AttributeIds.DisplayName].value
        return ua.ReferenceDescription(
            ReferenceTypeId=reference,
            IsForward=forward,
            NodeId=target,
            BrowseName=_plain(browse_name, ua.QualifiedName()),
            DisplayName=_plain(display_name, ua.LocalizedText()),
            NodeClass=_plain(node_class, ua.NodeClass.Unspecified),
            TypeDefinition=_type_of(data) or ua.NodeId(),
        )

    def _type_reference(self, type_id: ua.NodeId) -> ua.ReferenceDescription:
        made = self._type_refs.get(type_id)
        if made is None:
            made = self._reference_to(type_id, HAS_TYPE_DEFINITION, forward=True)
            made.TypeDefinition = ua.NodeId()
            self._type_refs[type_id] = made
        return made


def _plain(data: ua.DataValue | None, default: Any) -> Any:
    if data is None or data.Value is None or data.Value.Value is None:
        return default
    return data.Value.Value


def _type_of(data: NodeData) -> ua.NodeId | None:
    for reference in data.references:
        if reference.IsForward and reference.ReferenceTypeId == HAS_TYPE_DEFINITION:
            target: ua.NodeId = reference.NodeId
            return target
    return None
