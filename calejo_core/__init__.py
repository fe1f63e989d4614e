"""calejo_core: the compiled safety gate, register codecs and Modbus frames.

The core does no I/O, reads no clock and starts no event loop: every time
is passed in as ``now`` (seconds, any monotonic origin), and every buffer
is a NumPy array the caller owns or reads.
"""

from calejo_core.codecs import (
    EncodeError,
    StationImage,
    decode,
    decode_array,
    encode,
    encode_array,
)
from calejo_core.gate import (
    ACCEPTED,
    BLOCKED,
    CLAMPED,
    REJECTED,
    Gate,
    Outcome,
    PumpLimits,
)
from calejo_core.modbus import ModbusConnection, ModbusServerCore

__all__ = [
    "ACCEPTED",
    "BLOCKED",
    "CLAMPED",
    "REJECTED",
    "EncodeError",
    "Gate",
    "ModbusConnection",
    "ModbusServerCore",
    "Outcome",
    "PumpLimits",
    "StationImage",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
]

__version__ = "0.1.0"
