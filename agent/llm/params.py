"""Sampling parameters from a JSON object: the OpenAI routes' body and the
``sampling_parameters`` input of Triton's LLM convention are checked by the same code.

Every refusal is a :class:`~agent.errors.RequestError` naming the field and its value.
"""

from __future__ import annotations

import json
from typing import Any

from agent.errors import RequestError, echo
from agent.llm.types import Sampling

__all__ = ["SAMPLING_KEYS", "bad_value", "known_keys", "optional_bool", "parse_json", "required_string",
           "sampling_of"]

SAMPLING_KEYS = frozenset({"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                           "stop"})
_MAX_STOPS = 4  # OpenAI's limit


def bad_value(param: str, value: Any, want: str) -> RequestError:
    return RequestError(f"{param}: expected {want}, got {echo(json.dumps(value))}", param)


def _opt_int(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise bad_value(key, value, f"an integer >= {low}")
    return value


def _opt_number(body: dict[str, Any], key: str, low: float, high: float, default: float,
                *, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and \
        (low < value if open_low else low <= value) and value <= high
    if not ok:
        raise bad_value(key, value, f"a number in {'(' if open_low else '['}{low:g}, {high:g}]")
    return float(value)


def optional_bool(obj: dict[str, Any], key: str, param: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_value(param, value, "true or false")
    return value


def required_string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise bad_value(key, value, "a non-empty string")
    return value


def known_keys(body: dict[str, Any], keys: set[str]) -> None:
    unknown = sorted(set(body) - keys)
    if unknown:
        raise RequestError(f"{echo(unknown[0])}: unsupported parameter (supported: "
                           f"{', '.join(sorted(keys))})", unknown[0])


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > _MAX_STOPS or \
            not all(isinstance(s, str) and s for s in items):
        raise bad_value("stop", value, f"a string or a list of up to {_MAX_STOPS} non-empty strings")
    return tuple(items)


def sampling_of(body: dict[str, Any]) -> Sampling:
    """The :class:`Sampling` a JSON object asks for (absent keys: the defaults).

    Raises:
        RequestError: a value of the wrong type or out of range, ``n`` other than 1.
    """
    if body.get("n") not in (None, 1):
        raise bad_value("n", body["n"], "1 (one choice per request)")
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_value("seed", seed, "an integer")
    return Sampling(max_tokens=max_tokens,
                    temperature=_opt_number(body, "temperature", 0.0, 2.0, 1.0),
                    top_p=_opt_number(body, "top_p", 0.0, 1.0, 1.0, open_low=True),
                    top_k=_opt_int(body, "top_k", 0) or 0, seed=seed, stop=_stop(body))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, what: str = "request body") -> dict[str, Any]:
    """``data`` (``what``, for messages) as a JSON object.

    Raises:
        RequestError: not UTF-8, not JSON, NaN/Infinity, nested too deep, or not an object.
    """
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RequestError(f"{what} is not UTF-8") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise RequestError(f"{what} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"{what} must be a JSON object, not {type(body).__name__}")
    return body
