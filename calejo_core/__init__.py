"""calejo_core: the compiled safety gate, register codecs and Modbus frames.

The gate, the codecs and the frames do no I/O, read no clock and start no
event loop: every time is passed in as ``now`` (seconds, any monotonic
origin), and every buffer is a NumPy array the caller owns or reads. The
one exception, :mod:`calejo_core.filesync`, syncs a file to disk on a
thread that never takes the GIL, for the storage's durable commits.
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
