"""The adapter's lean nodes against asyncua's own, read by a real client.

The adapter builds its nodes into asyncua's address space directly,
sharing what is alike between them. These tests put a variable made the
usual asyncua way (AddNodes, on a plain asyncua server beside the
adapter) next to one of the adapter's, and hold the two to the same
attributes and references as a client sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from asyncua import Client, Server, ua
from asyncua.server.address_space import AttributeValue

from calejo_server.protocols.opcua_nodes import Attributes
from tests.server.protocols.conftest import free_port

ALL_ATTRIBUTES = [attribute for attribute in ua.AttributeIds]
IDENTITY = {
    ua.AttributeIds.NodeId,
    ua.AttributeIds.BrowseName,
    ua.AttributeIds.DisplayName,
    ua.AttributeIds.Description,
    ua.AttributeIds.Value,
}


@pytest.fixture(scope="module")
def adapter(opcua_harness: Any) -> Any:
    return opcua_harness.start(name="nodes")


@pytest.fixture(scope="module")
def native(opcua_harness: Any) -> Iterator[tuple[str, ua.NodeId]]:
    """A Double variable made by asyncua's AddNodes under a plain object, on
    a plain asyncua server; its endpoint and node id."""
    url = f"opc.tcp://127.0.0.1:{free_port()}"
    server = Server()

    async def make() -> ua.NodeId:
        await server.init()
        server.set_endpoint(url)
        ns = await server.register_namespace("urn:calejo-tests:native")
        holder = await server.nodes.objects.add_object(
            ua.NodeId("Native", ns), ua.QualifiedName("Native", ns)
        )
        variable = await holder.add_variable(
            ua.NodeId("Native/Value", ns),
            ua.QualifiedName("Value", ns),
            1.5,
            varianttype=ua.VariantType.Double,
        )
        await server.start()
        return variable.nodeid

    node_id = opcua_harness.run(make())
    try:
        yield url, node_id
    finally:
        opcua_harness.run(server.stop())


@asynccontextmanager
async def plain_client(url: str) -> AsyncIterator[Client]:
    client = Client(url, timeout=5)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def read_all(client: Any, node_id: ua.NodeId) -> dict[int, ua.DataValue]:
    node = client.get_node(node_id)
    values = await node.read_attributes(ALL_ATTRIBUTES)
    return dict(zip(ALL_ATTRIBUTES, values, strict=True))


def test_variable_attributes_match_asyncuas_own(
    opcua_harness: Any, adapter: Any, native: tuple[str, ua.NodeId]
) -> None:
    url, native_id = native

    async def scenario() -> tuple[dict[int, Any], dict[int, Any]]:
        async with opcua_harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            ours = ua.NodeId("PumpStations/north/Pumps/p1/Setpoint", ns)
            mine = await read_all(client, ours)
        async with plain_client(url) as client:
            return mine, await read_all(client, native_id)

    ours, theirs = opcua_harness.run(scenario())

    for attribute, data in theirs.items():
        if not data.StatusCode.is_good():
            continue
        mine = ours[attribute]
        assert mine.StatusCode.is_good(), attribute
        assert mine.Value.VariantType == data.Value.VariantType, attribute
        if attribute not in IDENTITY:
            assert mine.Value.Value == data.Value.Value, attribute

    assert ours[ua.AttributeIds.NodeId].Value.Value.Identifier == (
        "PumpStations/north/Pumps/p1/Setpoint"
    )
    assert ours[ua.AttributeIds.BrowseName].Value.Value.Name == "Setpoint"
    assert ours[ua.AttributeIds.DisplayName].Value.Value.Text == "Setpoint"
    assert "applied setpoint" in ours[ua.AttributeIds.Description].Value.Value.Text
    assert ours[ua.AttributeIds.AccessLevel].Value.Value == (
        ua.AccessLevel.CurrentRead.mask
    )
    assert not ours[ua.AttributeIds.EventNotifier].StatusCode.is_good()


def test_references_have_the_shape_of_asyncuas_own(
    opcua_harness: Any, adapter: Any, native: tuple[str, ua.NodeId]
) -> None:
    url, native_id = native

    def shape(references: list[Any]) -> set[tuple[Any, ...]]:
        return {
            (r.ReferenceTypeId, r.IsForward, r.NodeClass, r.TypeDefinition)
            for r in references
        }

    async def scenario() -> None:
        async with opcua_harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            ours = client.get_node(ua.NodeId("PumpStations/north/Pumps/p1/Target", ns))
            both = ua.BrowseDirection.Both
            mine = await ours.get_references(direction=both)
            async with plain_client(url) as plain:
                theirs = plain.get_node(native_id)
                native_refs = await theirs.get_references(direction=both)
            assert shape(mine) == shape(native_refs)

            parent = next(r for r in mine if not r.IsForward)
            assert parent.NodeId == ua.NodeId("PumpStations/north/Pumps/p1", ns)
            assert parent.BrowseName.Name == "p1"

            pump = client.get_node(ua.NodeId("PumpStations/north/Pumps/p1", ns))
            up = await pump.get_references(direction=ua.BrowseDirection.Inverse)
            assert [(r.ReferenceTypeId, r.BrowseName.Name) for r in up] == [
                (ua.NodeId(ua.ObjectIds.Organizes), "Pumps")
            ]

    opcua_harness.run(scenario())


def test_monitoring_and_unmonitoring_any_attribute(
    opcua_harness: Any, adapter: Any
) -> None:
    class Seen:
        def __init__(self) -> None:
            self.values: asyncio.Queue[Any] = asyncio.Queue()

        def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
            self.values.put_nowait(value)

    async def scenario() -> None:
        async with opcua_harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            node = client.get_node(
                ua.NodeId("PumpStations/south/Pumps/s1/MaxValue", ns)
            )
            seen = Seen()
            subscription = await client.create_subscription(50, seen)
            handles = [
                await subscription.subscribe_data_change(node, attr=attribute)
                for attribute in (
                    ua.AttributeIds.NodeId,
                    ua.AttributeIds.BrowseName,
                    ua.AttributeIds.Value,
                )
            ]
            first = [await asyncio.wait_for(seen.values.get(), 5) for _ in handles]
            assert 40.0 in first
            for handle in handles:
                await subscription.unsubscribe(handle)
            await subscription.delete()
            assert await node.read_value() == 40.0

    opcua_harness.run(scenario())


def test_attributes_mapping_keeps_value_and_node_id_its_own() -> None:
    shared = {ua.AttributeIds.AccessLevel: AttributeValue(ua.DataValue(ua.Variant(1)))}
    value = AttributeValue(ua.DataValue(ua.Variant(2.0)))
    one = Attributes(ua.NodeId("a", 2), shared, value)
    two = Attributes(ua.NodeId("b", 2), shared, None)

    assert one[ua.AttributeIds.Value] is value
    assert int(ua.AttributeIds.Value) in one and ua.AttributeIds.Value not in two
    assert one[13] is value
    assert one[ua.AttributeIds.AccessLevel] is two[ua.AttributeIds.AccessLevel]
    assert one[ua.AttributeIds.NodeId] is one[ua.AttributeIds.NodeId]
    assert one[ua.AttributeIds.NodeId].value.Value.Value == ua.NodeId("a", 2)
    assert two[ua.AttributeIds.NodeId].value.Value.Value == ua.NodeId("b", 2)
    assert list(one) == [
        ua.AttributeIds.NodeId,
        ua.AttributeIds.AccessLevel,
        ua.AttributeIds.Value,
    ]
    assert len(two) == 2

    replacement = AttributeValue(ua.DataValue(ua.Variant(3)))
    two[ua.AttributeIds.AccessLevel] = replacement
    assert two[ua.AttributeIds.AccessLevel] is replacement
    assert one[ua.AttributeIds.AccessLevel] is shared[ua.AttributeIds.AccessLevel]
    with pytest.raises(KeyError):
        _ = two[ua.AttributeIds.Historizing]
