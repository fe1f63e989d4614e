"""The protocol front ends that SCADA systems talk to: OPC UA and Modbus TCP.

Each front end reads live state from the control engine and sends every
command through it; none of them touches storage or another front end.
Import the module you need (``calejo_server.protocols.opcua``); this package
imports none of them, so one protocol's dependencies do not load the other's.
"""
