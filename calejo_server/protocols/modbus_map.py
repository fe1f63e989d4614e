"""The Modbus register map of each station, as the server serves it.

The rows come from :func:`calejo_core.codecs.register_map` for the
station's pump count and float word order, the same function that marks
the image's writable registers, so the printed map cannot drift from the
served one. This module adds what an integrator needs beside each row:
the 1-based reference number (4xxxx for holding registers, 0xxxx for
coils), the scale (the register holds value x scale), the units (the
pump's configured units where a row is in them) and the pump's id.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final, TextIO, cast

from calejo_core import codecs
from calejo_server.config import StationConfig

__all__ = [
    "MapRow",
    "generic_map",
    "reference",
    "station_map",
    "write_csv",
    "write_markdown",
]

CSV_COLUMNS: Final = (
    "unit_id",
    "station_id",
    "address",
    "number",
    "count",
    "name",
    "pump_id",
    "type",
    "scale",
    "units",
    "access",
    "description",
)
MARKDOWN_COLUMNS: Final = (
    "address",
    "number",
    "count",
    "name",
    "pump",
    "type",
    "scale",
    "units",
    "access",
    "description",
)

_FIXED_UNITS: Final = {
    "plc_heartbeat_age": "s",
    "station_level": "cm",
    "setpoint_age": "s",
    "power_x10": "kW",
}
_PUMP_UNITS: Final = frozenset(
    {"applied_x10", "applied", "target_x10", "min_x10", "max_x10", "speed_x10"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class MapRow:
    """One register (or run of registers) or coil of a station's map.

    ``coil`` rows are coils (function codes 1, 5, 15); the others are
    holding registers (3, 6, 16, 23; input registers, code 4, read the
    same). A value is ``register / scale`` in ``units``.
    """

    unit_id: int
    station_id: str
    address: int
    count: int
    name: str
    pump_id: str
    type: str
    scale: int
    units: str
    access: str
    description: str

    @property
    def coil(self) -> bool:
        return self.type == "coil"

    @property
    def number(self) -> str:
        return reference(self.address, coil=self.coil)


def reference(address: int, *, coil: bool = False) -> str:
    """The 1-based reference of a zero-based address: 40001 is address 0.

    Coils are 00001 upward; past address 9998 the number takes six digits.
    """
    prefix = "0" if coil else "4"
    digits = 4 if address < 9999 else 5
    return f"{prefix}{address + 1:0{digits}d}"


def station_map(station: StationConfig) -> list[MapRow]:
    """Every register and coil the station's unit id serves, in order."""
    order = cast("codecs.WordOrder", station.float_order)
    rows = codecs.register_map(len(station.pumps), order)
    return [_row(station.unit_id, station.station_id, row, station) for row in rows]


def generic_map() -> list[MapRow]:
    """The layout of a station of the largest size, without a configuration."""
    return [_row(0, "", row, None) for row in codecs.register_map(codecs.MAX_PUMPS)]


def _row(
    unit_id: int,
    station_id: str,
    row: codecs.RegisterRow,
    station: StationConfig | None,
) -> MapRow:
    prefix, _, field = row.name.rpartition(".")
    pump_id = ""
    units = _FIXED_UNITS.get(field, "")
    if prefix.startswith("pump"):
        index = int(prefix[4:])
        pump = station.pumps[index] if station is not None else None
        pump_id = pump.pump_id if pump is not None else ""
        pump_units = pump.units if pump is not None else "units"
        if field in _PUMP_UNITS:
            units = pump_units
        elif field == "max_rate_x10":
            units = f"{pump_units}/s"

    kind, scaled, _ = row.type.partition(" x10")
    return MapRow(
        unit_id=unit_id,
        station_id=station_id,
        address=row.address,
        count=row.quantity,
        name=row.name,
        pump_id=pump_id,
        type=kind if scaled else row.type,
        scale=10 if scaled else 1,
        units=units,
        access=row.access,
        description=row.description,
    )


def write_csv(stations: Iterable[Sequence[MapRow]], out: TextIO) -> None:
    """One CSV table of every station's rows, with a header line."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rows in stations:
        for row in rows:
            writer.writerow(
                (
                    row.unit_id,
                    row.station_id,
                    row.address,
                    row.number,
                    row.count,
                    row.name,
                    row.pump_id,
                    row.type,
                    row.scale,
                    row.units,
                    row.access,
                    row.description,
                )
            )


def write_markdown(
    stations: Iterable[tuple[StationConfig, Sequence[MapRow]]], out: TextIO
) -> None:
    """A heading and a table per station, as docs/modbus.md shows them."""
    first = True
    for station, rows in stations:
        if not first:
            out.write("\n")
        first = False
        out.write(
            f"### Unit {station.unit_id}: station {station.station_id} "
            f"({len(station.pumps)} pumps, float32 {station.float_order})\n\n"
        )
        out.write(_line(MARKDOWN_COLUMNS))
        out.write(_line(tuple("---" for _ in MARKDOWN_COLUMNS)))
        for row in rows:
            out.write(
                _line(
                    (
                        str(row.address),
                        row.number,
                        str(row.count),
                        f"`{row.name}`",
                        row.pump_id,
                        row.type,
                        str(row.scale),
                        row.units,
                        row.access,
                        row.description,
                    )
                )
            )


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"
