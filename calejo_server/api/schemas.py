"""Small schema objects: they check request data and describe it in OpenAPI.

Each schema checks a decoded JSON value (or the text of a query
parameter) and gives back the value to use, or raises
:class:`ValidationError` naming the field, what was expected and what
arrived: ``field 'value': expected a number, got string``. The same
object writes its JSON Schema for the OpenAPI document, so what the
document promises is exactly what is checked.
"""

from __future__ import annotations

import abc
import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.(\d+))?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,18}")
_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class ValidationError(ValueError):
    """A value that does not fit its schema; ``field`` is its path."""

    def __init__(self, field: str, message: str) -> None:
        where = f"field {field!r}" if field else "body"
        super().__init__(f"{where}: {message}")
        self.field = field
        self.message = message

    def within(self, parent: str) -> ValidationError:
        """The same error, seen from the object or array holding the value."""
        if not self.field:
            field = parent
        elif not parent:
            field = self.field
        elif self.field.startswith("["):
            field = parent + self.field
        else:
            field = f"{parent}.{self.field}"
        return ValidationError(field, self.message)


def type_name(value: object) -> str:
    """The JSON name of the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Schema(abc.ABC):
    """A part of a request or an answer."""

    description: str | None = None
    example: Any = None

    @abc.abstractmethod
    def check(self, value: object, path: str) -> Any:
        """The value to use, or :class:`ValidationError`."""

    def parse(self, text: str, path: str) -> Any:
        """Check the text of a query parameter."""
        return self.check(text, path)

    @abc.abstractmethod
    def json_type(self) -> dict[str, Any]:
        """The JSON Schema of this part, without description."""

    def json_schema(self) -> dict[str, Any]:
        schema = self.json_type()
        if self.description:
            schema["description"] = self.description
        if self.example is not None:
            schema["examples"] = [self.example]
        return schema


class String(Schema):
    """A string of ``min_length`` to ``max_length`` characters.

    ``pattern`` must match the whole string; ``pattern_text`` says in
    words what it allows, for error messages.
    """

    def __init__(
        self,
        *,
        min_length: int = 0,
        max_length: int | None = None,
        pattern: str | None = None,
        pattern_text: str | None = None,
        enum: Sequence[str] | None = None,
        description: str | None = None,
        example: str | None = None,
        fmt: str | None = None,
    ) -> None:
        self.min_length = min_length
        self.max_length = max_length
        self.pattern = pattern
        self._regex = re.compile(pattern) if pattern else None
        self.pattern_text = pattern_text or (
            f"a string matching {pattern}" if pattern else None
        )
        self.enum = tuple(enum) if enum is not None else None
        self.description = description
        self.example = example
        self.fmt = fmt

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, str):
            raise ValidationError(path, f"expected a string, got {type_name(value)}")

        if self.enum is not None and value not in self.enum:
            raise ValidationError(
                path, f"expected one of {', '.join(self.enum)}, got {_shown(value)}"
            )

        if len(value) < self.min_length:
            raise ValidationError(
                path,
                f"expected at least {_plural(self.min_length, 'character')}, "
                f"got {len(value)}",
            )

        if self.max_length is not None and len(value) > self.max_length:
            raise ValidationError(
                path,
                f"expected at most {_plural(self.max_length, 'character')}, "
                f"got {len(value)}",
            )

        if self._regex is not None and not self._regex.fullmatch(value):
            raise ValidationError(
                path, f"expected {self.pattern_text}, got {_shown(value)}"
            )
        return value

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.min_length:
            schema["minLength"] = self.min_length
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.pattern is not None:
            schema["pattern"] = f"^(?:{self.pattern})$"
        if self.fmt is not None:
            schema["format"] = self.fmt
        return schema


class DateTime(Schema):
    """An RFC 3339 date and time with its offset.

    Checked to a UTC ``datetime``, or with ``as_text`` to the same moment
    as ISO 8601 text in UTC (for bodies handed on as JSON).
    """

    def __init__(
        self,
        *,
        description: str | None = None,
        example: str | None = None,
        as_text: bool = False,
    ) -> None:
        self.description = description
        self.example = example
        self.as_text = as_text

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, str):
            raise ValidationError(
                path, f"expected a date-time string, got {type_name(value)}"
            )

        match = _RFC3339.fullmatch(value)
        if match is None:
            raise ValidationError(
                path,
                "expected an RFC 3339 date-time with offset, like "
                f"2025-01-31T12:00:00Z, got {_shown(value)}",
            )

        text = value.upper().replace("Z", "+00:00")
        fraction = match.group(1)
        if fraction is not None and len(fraction) > 6:
            text = text.replace("." + fraction, "." + fraction[:6], 1)
        try:
            parsed = dt.datetime.fromisoformat(text).astimezone(dt.UTC)
        except (ValueError, OverflowError):
            raise ValidationError(
                path, f"expected a valid date-time, got {_shown(value)}"
            ) from None
        return parsed.isoformat() if self.as_text else parsed

    def json_type(self) -> dict[str, Any]:
        return {"type": "string", "format": "date-time"}


class Number(Schema):
    """A finite JSON number (an integer or a fraction; not a boolean)."""

    def __init__(
        self,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        description: str | None = None,
        example: float | None = None,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.description = description
        self.example = example

    def check(self, value: object, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(path, f"expected a number, got {type_name(value)}")

        number = float(value)
        if not math.isfinite(number):
            raise ValidationError(
                path, "expected a finite number, got a number out of range"
            )
        if self.minimum is not None and number < self.minimum:
            raise ValidationError(
                path, f"expected at least {self.minimum:g}, got {number:g}"
            )
        if self.maximum is not None and number > self.maximum:
            raise ValidationError(
                path, f"expected at most {self.maximum:g}, got {number:g}"
            )
        return number

    def parse(self, text: str, path: str) -> Any:
        if not _NUMBER_TEXT.fullmatch(text):
            raise ValidationError(path, f"expected a number, got {_shown(text)}")
        return self.check(float(text), path)

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema


class Integer(Schema):
    """A whole number between ``minimum`` and ``maximum`` (1.0 counts as 1)."""

    def __init__(
        self,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        description: str | None = None,
        example: int | None = None,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.description = description
        self.example = example

    def check(self, value: object, path: str) -> Any:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)

        if isinstance(value, bool) or not isinstance(value, int):
            got = "a fraction" if isinstance(value, float) else type_name(value)
            raise ValidationError(path, f"expected an integer, got {got}")

        if self.minimum is not None and value < self.minimum:
            raise ValidationError(
                path, f"expected at least {self.minimum}, got {value}"
            )
        if self.maximum is not None and value > self.maximum:
            raise ValidationError(path, f"expected at most {self.maximum}, got {value}")
        return value

    def parse(self, text: str, path: str) -> Any:
        if not _INTEGER_TEXT.fullmatch(text):
            raise ValidationError(path, f"expected an integer, got {_shown(text)}")
        return self.check(int(text), path)

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema


class Boolean(Schema):
    """``true`` or ``false``."""

    def __init__(
        self, *, description: str | None = None, const: bool | None = None
    ) -> None:
        self.description = description
        self.const = const

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, bool):
            raise ValidationError(path, f"expected a boolean, got {type_name(value)}")
        if self.const is not None and value is not self.const:
            raise ValidationError(
                path, f"expected {str(self.const).lower()}, got {str(value).lower()}"
            )
        return value

    def parse(self, text: str, path: str) -> Any:
        if text not in ("true", "false"):
            raise ValidationError(path, f"expected true or false, got {_shown(text)}")
        return self.check(text == "true", path)

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "boolean"}
        if self.const is not None:
            schema["const"] = self.const
        return schema


class Nullable(Schema):
    """``inner`` or ``null``."""

    def __init__(self, inner: Schema, *, description: str | None = None) -> None:
        self.inner = inner
        self.description = description or inner.description

    def check(self, value: object, path: str) -> Any:
        if value is None:
            return None
        return self.inner.check(value, path)

    def json_type(self) -> dict[str, Any]:
        inner = self.inner.json_type()
        kind = inner.get("type")
        if isinstance(kind, str) and "enum" not in inner and "const" not in inner:
            return {**inner, "type": [kind, "null"]}
        return {"anyOf": [inner, {"type": "null"}]}


class Array(Schema):
    """A list of ``items``, ``min_items`` to ``max_items`` long."""

    def __init__(
        self,
        items: Schema,
        *,
        min_items: int = 0,
        max_items: int | None = None,
        unique: bool = False,
        description: str | None = None,
    ) -> None:
        self.items = items
        self.min_items = min_items
        self.max_items = max_items
        self.unique = unique
        self.description = description

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, list):
            raise ValidationError(path, f"expected an array, got {type_name(value)}")

        if len(value) < self.min_items:
            raise ValidationError(
                path,
                f"expected at least {_plural(self.min_items, 'item')}, "
                f"got {len(value)}",
            )
        if self.max_items is not None and len(value) > self.max_items:
            raise ValidationError(
                path,
                f"expected at most {_plural(self.max_items, 'item')}, got {len(value)}",
            )

        items = self.items
        try:
            checked = [items.check(item, "") for item in value]
        except ValidationError:
            checked = [
                items.check(item, f"{path}[{i}]") for i, item in enumerate(value)
            ]
        if self.unique:
            seen: set[Any] = set()
            for i, item in enumerate(checked):
                key = repr(item)
                if key in seen:
                    raise ValidationError(
                        f"{path}[{i}]", "expected unique items, got a repeat"
                    )
                seen.add(key)
        return checked

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array", "items": self.items.json_schema()}
        if self.min_items:
            schema["minItems"] = self.min_items
        if self.max_items is not None:
            schema["maxItems"] = self.max_items
        if self.unique:
            schema["uniqueItems"] = True
        return schema


class Object(Schema):
    """A JSON object with the given ``properties``.

    Request objects are closed (an unknown key is an error, so a typing
    mistake in a field name is never silently ignored); answers are open,
    so a client keeps working when an answer gains a field.
    """

    def __init__(
        self,
        properties: Mapping[str, Schema],
        *,
        required: Sequence[str] = (),
        closed: bool = True,
        extra: Schema | None = None,
        min_properties: int = 0,
        description: str | None = None,
        example: Any = None,
    ) -> None:
        self.properties = dict(properties)
        self.required = tuple(required)
        self._required = frozenset(self.required)
        self._names = frozenset(self.properties)
        self.closed = closed and extra is None
        self.extra = extra
        self.min_properties = min_properties
        self.description = description
        self.example = example

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, dict):
            raise ValidationError(path, f"expected an object, got {type_name(value)}")

        if not self._required <= value.keys():
            missing = next(n for n in self.required if n not in value)
            raise ValidationError(_join(path, missing), "required but missing")

        if self.closed and not value.keys() <= self._names:
            for name in value:
                if name not in self.properties:
                    raise ValidationError(
                        _join(path, name),
                        "not allowed here; expected only "
                        f"{', '.join(self.properties) or 'no fields'}",
                    )

        if len(value) < self.min_properties:
            raise ValidationError(
                path,
                f"expected at least {_plural(self.min_properties, 'field')} "
                f"of {', '.join(self.properties)}, got {len(value)}",
            )

        checked: dict[str, Any] = {}
        for name, item in value.items():
            schema = self.properties.get(name, self.extra)
            if schema is None:
                checked[name] = item
                continue
            try:
                checked[name] = schema.check(item, "")
            except ValidationError as exc:
                raise exc.within(_join(path, name)) from None
        return checked

    def json_type(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                name: s.json_schema() for name, s in self.properties.items()
            },
        }
        if self.required:
            schema["required"] = list(self.required)
        if self.closed:
            schema["additionalProperties"] = False
        elif self.extra is not None:
            schema["additionalProperties"] = self.extra.json_schema()
        if self.min_properties:
            schema["minProperties"] = self.min_properties
        return schema


class AnyObject(Schema):
    """Any JSON object (free-form details)."""

    def __init__(self, *, description: str | None = None) -> None:
        self.description = description

    def check(self, value: object, path: str) -> Any:
        if not isinstance(value, dict):
            raise ValidationError(path, f"expected an object, got {type_name(value)}")
        return value

    def json_type(self) -> dict[str, Any]:
        return {"type": "object"}


class Text(Schema):
    """A plain-text answer (documentation only)."""

    def __init__(self, *, description: str | None = None) -> None:
        self.description = description

    def check(self, value: object, path: str) -> Any:
        return String().check(value, path)

    def json_type(self) -> dict[str, Any]:
        return {"type": "string"}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
