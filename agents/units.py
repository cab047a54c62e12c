"""``convert``: unit conversion for agents (length, mass, time, volume, speed, temperature).

Why a tool for it: word problems mix units (minutes and hours, pounds and ounces, gallons and quarts),
and a small model gets the factors wrong far more often than the arithmetic; a table it can call is
exact. Factors are to one base unit per dimension (metre, kilogram, second, litre, metre per second);
temperatures are affine, converted through kelvin. Units are named as people write them (``km``,
``kilometers``, ``mph``, ``°F``); unknown names and conversions across dimensions are refused naming the
units that exist.
"""
from __future__ import annotations

from typing import ClassVar

from puyu.agents.actions import Action, ActionError

# dimension -> {unit: factor to the base unit}; aliases below map other spellings to these keys
FACTORS: dict[str, dict[str, float]] = {
    "length": {"mm": 1e-3, "cm": 1e-2, "m": 1.0, "km": 1e3, "in": 0.0254, "ft": 0.3048, "yd": 0.9144,
               "mi": 1609.344},
    "mass": {"mg": 1e-6, "g": 1e-3, "kg": 1.0, "t": 1e3, "oz": 0.028349523125, "lb": 0.45359237},
    "time": {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0, "week": 604800.0, "year": 31557600.0},
    "volume": {"ml": 1e-3, "l": 1.0, "gal": 3.785411784, "qt": 0.946352946, "pt": 0.473176473,
               "cup": 0.2365882365, "floz": 0.0295735295625},
    "speed": {"m/s": 1.0, "km/h": 1 / 3.6, "mph": 0.44704},
}
TEMPERATURE = ("c", "f", "k")
ALIASES = {
    "millimeter": "mm", "centimeter": "cm", "meter": "m", "metre": "m", "kilometer": "km", "kilometre": "km",
    "inch": "in", "inches": "in", "foot": "ft", "feet": "ft", "yard": "yd", "mile": "mi",
    "milligram": "mg", "gram": "g", "kilogram": "kg", "tonne": "t", "ton": "t", "ounce": "oz", "pound": "lb",
    "lbs": "lb", "sec": "s", "second": "s", "minute": "min", "hour": "h", "hr": "h", "d": "day", "wk": "week",
    "yr": "year", "milliliter": "ml", "millilitre": "ml", "liter": "l", "litre": "l", "gallon": "gal",
    "quart": "qt", "pint": "pt", "fl oz": "floz", "fluid ounce": "floz", "kmh": "km/h", "kph": "km/h",
    "mps": "m/s", "miles per hour": "mph", "celsius": "c", "°c": "c", "fahrenheit": "f", "°f": "f",
    "kelvin": "k",
}


def canonical(unit: str) -> str:
    """``unit`` as a key of FACTORS/TEMPERATURE: lower-cased, aliases and plural -s resolved."""
    u = " ".join(unit.strip().lower().split())
    if u in ALIASES:
        return ALIASES[u]
    if u.endswith("s") and u[:-1] in ALIASES:
        return ALIASES[u[:-1]]
    if u.endswith("s") and any(u[:-1] in f for f in FACTORS.values()):
        return u[:-1]
    return u


def dimension(unit: str) -> str | None:
    if unit in TEMPERATURE:
        return "temperature"
    return next((dim for dim, table in FACTORS.items() if unit in table), None)


def to_kelvin(value: float, unit: str) -> float:
    return {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[unit]


def from_kelvin(value: float, unit: str) -> float:
    return {"c": value - 273.15, "f": (value - 273.15) * 9 / 5 + 32, "k": value}[unit]


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``; raises ActionError naming a bad unit."""
    a, b = canonical(from_unit), canonical(to_unit)
    dims = [dimension(a), dimension(b)]
    for name, dim in zip((from_unit, to_unit), dims):
        if dim is None:
            known = sorted({u for t in FACTORS.values() for u in t} | {"C", "F", "K"})
            raise ActionError(f"convert: unknown unit {name!r}; known: {', '.join(known)}")
    if dims[0] != dims[1]:
        raise ActionError(f"convert: cannot convert {dims[0]} ({from_unit}) to {dims[1]} ({to_unit})")
    if dims[0] == "temperature":
        return from_kelvin(to_kelvin(value, a), b)
    table = FACTORS[dims[0]]
    return value * table[a] / table[b]


class UnitConverter(Action):
    name = "convert"
    description = ("Converts a value between units of length, mass, time, volume, speed or temperature, "
                   "e.g. 90 min to h.")
    parameters: ClassVar[dict] = {"type": "object", "properties": {
        "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
        "required": ["value", "from_unit", "to_unit"]}

    def run(self, value: float, from_unit: str, to_unit: str) -> str:
        result = round(convert(value, from_unit, to_unit), 10)
        return str(int(result)) if result.is_integer() and abs(result) < 1e15 else repr(result)
