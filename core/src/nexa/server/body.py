"""How a request body becomes a wire value, the same way on every route.

A route declares its body (``data: JSONBody[wire.X]``, or a multipart body); this module
owns what happens to the bytes:

- ``declared_body``: the media type and wire type a route handler takes, read once from
  its signature (the guard checks ``Content-Type`` against it).
- ``NexaRequest``: the app's request class. Its ``json()`` decodes the body *strictly*
  into the declared type (``"max_tokens": "3"`` is a 400 naming ``max_tokens``, as with
  OpenAI; Litestar's own conversion would coerce it), refuses JSON nested deeper than
  ``max_json_depth`` (the decoder's own recursion guard is a RecursionError, a 500
  before this), and turns every decoding error into an OpenAI-shaped 400.

Litestar then finds an already-typed value and passes it through unchanged.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi
from litestar import Request
from litestar.enums import RequestEncodingType
from litestar.handlers import BaseRouteHandler
from litestar.utils.empty import value_or_default

from nexa.config import ServerConfig
from nexa.errors import BadRequest


class BodySpec(NamedTuple):
    media_type: str
    """``application/json``, ``multipart/form-data`` or ``application/x-www-form-urlencoded``."""
    annotation: Any
    """The wire type (a msgspec Struct for JSON bodies)."""


@functools.lru_cache(maxsize=256)
def declared_body(handler: BaseRouteHandler) -> BodySpec | None:
    """What body the route handler takes; None when it takes none."""
    parameters = getattr(handler, "parsed_fn_signature", None)
    field = parameters.parameters.get("data") if parameters is not None else None
    if field is None:
        return None
    media = getattr(field.kwarg_definition, "media_type", None) or RequestEncodingType.JSON
    return BodySpec(str(getattr(media, "value", media)), field.annotation)


# --- strict decoding --------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _decoder(annotation: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(annotation, strict=True)


# msgspec ends its message with where: "- at `$.a.b[1]`", or for a map's key "- at `key` in `$.a`".
_AT = re.compile(r"^(?P<detail>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_TYPE = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")


def _param(path: str) -> str | None:
    return path.lstrip(".") or None


def invalid_body(exc: msgspec.ValidationError) -> BadRequest:
    """msgspec's message as OpenAI's: which field, what was expected, what came."""
    found = _AT.match(str(exc))
    detail = found.group("detail") if found else str(exc)
    param = _param(found.group("path") or "") if found else None
    if (missing := _MISSING.match(detail)) is not None:
        name = f"{param}.{missing.group('name')}" if param else missing.group("name")
        return BadRequest(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    if found and found.group("key"):
        where = f"a key of {where}"
    if (wrong := _TYPE.match(detail)) is not None:
        return BadRequest(
            f"Invalid type for {where}: expected {wrong.group('want')}, but got {wrong.group('got')} instead.",
            param=param, code="invalid_type",
        )
    return BadRequest(f"Invalid value for {where}: {detail}.", param=param, code="invalid_value")


def too_deep(limit: int, param: str | None = None) -> BadRequest:
    where = f"{param} is" if param else "the request body is"
    return BadRequest(f"{where} nested too deeply: at most {limit} levels of objects and arrays are allowed",
                      param=param, code="nested_too_deeply")


def decode_json(body: bytes, annotation: Any, config: ServerConfig) -> Any:
    """``body`` decoded strictly as ``annotation``, within the nesting cap; BadRequest otherwise."""
    try:
        value = _decoder(annotation).decode(body)
    except RecursionError:
        # msgspec's guard against the C stack: hit by ~1000 levels in a free-form part.
        raise too_deep(config.max_json_depth) from None
    except msgspec.ValidationError as exc:
        if not _INTEGRAL_FLOAT.search(str(exc)):
            raise invalid_body(exc) from None
        value = _decode_with_integral_floats(body, annotation, config.max_json_depth)
    except msgspec.DecodeError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    check_depth(value, annotation, config.max_json_depth)
    return value


# "Expected `int`, got `float`" (or `int | null`...): maybe a number like 2.0.
_INTEGRAL_FLOAT = re.compile(r"^Expected `[^`]*\bint\b[^`]*`, got `float`")
_LARGEST_INT = 2**63


def _decode_with_integral_floats(body: bytes, annotation: Any, limit: int) -> Any:
    """The slow path for a body with a number like ``2.0`` where an integer goes.

    JSON has one number type, and JSON Schema (so the OpenAPI document) counts 2.0 as an
    integer; msgspec's strict mode does not. Integral floats become ints, then the value
    is converted as strictly as before (2.5 is still refused).
    """
    try:
        raw = msgspec.json.decode(body)
    except RecursionError:
        raise too_deep(limit) from None
    _check_free_form(raw, 0, limit, "")  # before the recursive walk below
    try:
        return msgspec.convert(_integral_to_int(raw), annotation, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from None


def _integral_to_int(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _LARGEST_INT else value
    if isinstance(value, list):
        return [_integral_to_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_to_int(v) for k, v in value.items()}
    return value


# --- nesting ------------------------------------------------------------------------------
# Typed parts of a body have the depth of their type; only free-form parts (``Any``: tool
# parameters, JSON schemas) can nest without bound. The walk follows the declared type, so
# that a 32 MB token array is never looked at element by element.


def _bare(info: mi.Type) -> mi.Type:
    """The type under ``Annotated`` metadata."""
    while isinstance(info, mi.Metadata):
        info = info.type
    return info


def _may_nest(info: mi.Type) -> bool:
    """Whether values of this type contain objects or arrays."""
    info = _bare(info)
    if isinstance(info, (mi.AnyType, mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType,
                         mi.DictType, mi.TupleType, mi.StructType, mi.TypedDictType, mi.DataclassType,
                         mi.NamedTupleType)):
        return True
    if isinstance(info, mi.UnionType):
        return any(_may_nest(t) for t in info.types)
    return False


def _items(info: mi.Type) -> mi.Type | None:
    """The type of a container's elements (a dict's values)."""
    return getattr(info, "item_type", None) or getattr(info, "value_type", None)


def check_depth(value: Any, annotation: Any, limit: int) -> None:
    """Refuse ``value`` (decoded as ``annotation``) if objects and arrays nest past ``limit``."""
    stack: list[tuple[Any, mi.Type, int, str]] = [(value, _type_info(annotation), 0, "")]
    while stack:
        item, info, depth, path = stack.pop()
        info = _bare(info)
        if isinstance(info, mi.UnionType):
            info = _pick_member(info, item)
            if info is None:
                continue
        if isinstance(info, mi.AnyType):
            _check_free_form(item, depth, limit, path)
            continue
        if isinstance(info, (mi.StructType, mi.DataclassType, mi.TypedDictType)):
            if depth + 1 > limit:
                raise too_deep(limit, path.lstrip(".") or None)
            for field in info.fields:
                if _may_nest(field.type):
                    child = item.get(field.name) if isinstance(item, dict) else getattr(item, field.name, None)
                    if child is not None and not isinstance(child, msgspec.UnsetType):
                        stack.append((child, field.type, depth + 1, f"{path}.{field.encode_name}"))
            continue
        inner = _items(info)
        if inner is None or not isinstance(item, (list, tuple, dict, set, frozenset)):
            continue
        if depth + 1 > limit:
            raise too_deep(limit, path.lstrip(".") or None)
        if not _may_nest(inner):
            continue
        if isinstance(item, dict):
            stack.extend((v, inner, depth + 1, f"{path}.{k}") for k, v in item.items())
        else:
            stack.extend((v, inner, depth + 1, f"{path}[{i}]") for i, v in enumerate(item))


@functools.lru_cache(maxsize=256)
def _type_info(annotation: Any) -> mi.Type:
    return mi.type_info(annotation)


def _pick_member(union: mi.UnionType, item: Any) -> mi.Type | None:
    """The member of a union that a decoded value came from (containers only)."""
    for member in map(_bare, union.types):
        if isinstance(member, mi.AnyType):
            return member
        if isinstance(member, mi.StructType) and isinstance(item, member.cls):
            return member
        if isinstance(member, (mi.DictType, mi.TypedDictType)) and isinstance(item, dict):
            return member
        if isinstance(member, (mi.ListType, mi.VarTupleType, mi.TupleType)) and isinstance(item, (list, tuple)):
            return member
    return None


def _check_free_form(value: Any, depth: int, limit: int, path: str) -> None:
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level + 1 > limit:
            raise too_deep(limit, path.lstrip(".") or None)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))


# --- the request class ----------------------------------------------------------------------


class NexaRequest(Request):
    """Litestar's request, with ``json()`` decoding strictly into the route's declared body type."""

    async def json(self) -> Any:
        cached = value_or_default(self._json, None)
        if cached is not None:
            return cached
        body = await self.body()
        spec = declared_body(self.route_handler)
        annotation = spec.annotation if spec is not None and spec.media_type == RequestEncodingType.JSON else Any
        config: ServerConfig = self.app.state.config
        self._json = decode_json(body or b"null", annotation, config)
        return self._json
