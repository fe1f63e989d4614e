"""``calejo modbus-map`` and ``calejo modbus read``.

``modbus-map`` prints the register map of every configured station (the
demonstration station without a configuration) from the same code that
serves it. ``modbus read`` reads registers or coils from any Modbus TCP
server with the pymodbus client and names each address from the map of
the station with that unit id in the configuration (else from the generic
layout).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TextIO

from calejo_server.config import Config, load_config
from calejo_server.protocols.modbus_map import (
    MapRow,
    generic_map,
    station_map,
    write_csv,
    write_markdown,
)

if TYPE_CHECKING:
    from pymodbus.pdu import ModbusPDU

__all__ = [
    "ModbusReadError",
    "map_arguments",
    "modbus_arguments",
    "read",
    "run_map",
    "run_modbus",
]

MAX_REGISTERS: Final = 125
MAX_COILS: Final = 2000
EXCEPTION_NAMES: Final = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond (no such unit id)",
}


class ModbusReadError(Exception):
    """A read that got no answer, or an exception answer."""


# -- modbus-map ---------------------------------------------------------------


def map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the Modbus register map of every configured station (the "
        "demonstration station without a configuration): address, 4xxxx "
        "reference, name, type, scale, units and access of each holding "
        "register and coil, as the adapter serves them."
    )
    parser.add_argument(
        "--format",
        choices=("md", "csv"),
        default="md",
        help="markdown tables, one per station (default), or one CSV table",
    )


def run_map(args: argparse.Namespace) -> int:
    config = load_config(getattr(args, "config", None))
    print_map(config, args.format, sys.stdout)
    return 0


def print_map(config: Config, form: str, out: TextIO) -> None:
    """Write the map of ``config``'s stations as ``md`` or ``csv``."""
    stations = [(station, station_map(station)) for station in config.stations]
    if form == "csv":
        write_csv((rows for _, rows in stations), out)
    else:
        write_markdown(stations, out)


# -- modbus read --------------------------------------------------------------


def modbus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Talk to a Modbus TCP server (the adapter or any other)."
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    read_parser = actions.add_parser(
        "read",
        help="read holding registers (or coils) and print one line per address",
        description="Read COUNT holding registers (function 3) or, with "
        "--coils, coils (function 1) from ADDRESS on (zero-based: 40001 is "
        "address 0) and print address, value and name. Exit 0 on an answer, "
        "1 on a timeout, a refused connection or an exception answer.",
    )
    read_parser.add_argument("host")
    read_parser.add_argument("port", type=_bounded("port", 1, 65535))
    read_parser.add_argument("address", type=_bounded("address", 0, 65535))
    read_parser.add_argument("count", type=_bounded("count", 1, MAX_COILS))
    read_parser.add_argument(
        "--unit", type=_bounded("unit id", 0, 255), default=1, help="default 1"
    )
    read_parser.add_argument(
        "--coils", action="store_true", help="read coils instead of registers"
    )
    read_parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help="seconds to wait for the connection and the answer (default 3)",
    )


def run_modbus(args: argparse.Namespace) -> int:
    from calejo_server.cli import CommandError

    if not args.coils and args.count > MAX_REGISTERS:
        raise CommandError(
            f"count: expected 1 to {MAX_REGISTERS} registers per read, got "
            f"{args.count}",
            2,
        )
    if not 0 < args.timeout <= 300:
        raise CommandError(
            f"--timeout: expected 0 to 300 seconds, got {args.timeout:g}", 2
        )

    config = load_config(getattr(args, "config", None))
    try:
        values = asyncio.run(
            read(
                args.host,
                args.port,
                args.address,
                args.count,
                unit=args.unit,
                coils=args.coils,
                timeout=args.timeout,
            )
        )
    except ModbusReadError as exc:
        raise CommandError(f"modbus read: {exc}") from exc

    print_values(config, args.unit, args.address, values, args.coils, sys.stdout)
    return 0


async def read(
    host: str,
    port: int,
    address: int,
    count: int,
    *,
    unit: int = 1,
    coils: bool = False,
    timeout: float = 3.0,
) -> list[int]:
    """Read ``count`` registers (or coils) from ``address``; their values.

    Raises ModbusReadError naming the server, the unit and the addresses.
    """
    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.exceptions import ModbusException

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    where = f"{host}:{port}"
    what = f"{'coils' if coils else 'registers'} {address}..{address + count - 1}"
    client = AsyncModbusTcpClient(
        host, port=port, timeout=timeout, retries=0, reconnect_delay=0
    )
    try:
        try:
            async with asyncio.timeout(timeout):
                connected = await client.connect()
        except TimeoutError:
            connected = False
        if not connected:
            raise ModbusReadError(
                f"cannot connect to {where} within {timeout:g} s (refused, "
                "unreachable or not listening)"
            )

        try:
            answer: ModbusPDU
            if coils:
                answer = await client.read_coils(address, count=count, device_id=unit)
            else:
                answer = await client.read_holding_registers(
                    address, count=count, device_id=unit
                )
        except ModbusException as exc:
            raise ModbusReadError(
                f"no answer from {where} unit {unit} for {what} within "
                f"{timeout:g} s ({exc})"
            ) from exc
    finally:
        client.close()

    if answer.isError():
        code = int(getattr(answer, "exception_code", 0))
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        raise ModbusReadError(
            f"{where} unit {unit} answered exception {code:02X} ({name}) for {what}"
        )
    values = answer.bits if coils else answer.registers
    return [int(value) for value in values[:count]]


def print_values(
    config: Config,
    unit: int,
    address: int,
    values: list[int],
    coils: bool,
    out: TextIO,
) -> None:
    """One line per address: the address, the value and what the map calls it.

    A scaled register shows its value in units too (``200  ... = 20 Hz``).
    """
    names = _names(config, unit, coils)
    for offset, value in enumerate(values):
        at = address + offset
        found = names.get(at)
        text = ""
        if found is not None:
            row, word = found
            text = row.name + (f" ({row.pump_id})" if row.pump_id else "")
            if row.count > 1:
                text += f" word {word + 1} of {row.count}"
            elif row.scale != 1 or row.units:
                text += f" = {value / row.scale:g} {row.units}"
        print(f"{at:>5}  {value:>5}  {text}".rstrip(), file=out)


def _names(config: Config, unit: int, coils: bool) -> dict[int, tuple[MapRow, int]]:
    rows: list[MapRow] = next(
        (station_map(s) for s in config.stations if s.unit_id == unit), generic_map()
    )
    return {
        row.address + word: (row, word)
        for row in rows
        if row.coil == coils
        for word in range(row.count)
    }


def _bounded(what: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {what} from {low} to {high}, got {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a {what} from {low} to {high}, got {value}"
            )
        return value

    parse.__name__ = what
    return parse
