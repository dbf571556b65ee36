"""Checks of a parsed gin configuration before a run starts, so that a mistake on the command line
is one line naming the binding, not a failure deep inside the run or a silently ignored value:

- `check_required_macros`: a macro a run file marks `%gin.REQUIRED` that the user did not bind;
- `check_unused_macros`: a macro bound on the command line (`--gin.TRAIN_STEP=5`) that no
  configurable and no other macro reads, such as a misspelled name;
- `check_value_types`: a value bound to a parameter whose annotation it does not fit
  (`BATCH_SIZE='eight'` for `batch_size: int`).

Each raises `GinBindingError` (a ValueError) whose message names the binding and its fix.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gin

MACRO = "gin.macro"


class GinBindingError(ValueError):
    """A gin binding that cannot work; the message names it."""


def _config() -> dict[tuple[str, str], dict[str, Any]]:
    return gin.config._CONFIG  # gin has no public view of the parsed bindings


def _macro_name(value) -> str | None:
    """'NAME' for a `%NAME` reference, 'gin.REQUIRED' for `%gin.REQUIRED`, else None."""
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == MACRO:
        return value.scoped_selector.rpartition("/")[0]
    if isinstance(value, gin.config.ConfigurableReference) and repr(value) == "%gin.REQUIRED":
        return "gin.REQUIRED"
    return None


def _references(value) -> Iterable[str]:
    """The macro names a bound value reads, at any depth of lists, tuples and dicts."""
    name = _macro_name(value)
    if name is not None:
        yield name
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _references(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _references(v)


def macros() -> dict[str, Any]:
    """{macro name: bound value} of the parsed configuration."""
    return {scope: params["value"] for (scope, selector), params in _config().items()
            if selector == MACRO and "value" in params}


def _resolve(value, seen=()):
    """`value` with macros replaced by their values (a reference to a configurable stays)."""
    name = _macro_name(value)
    if name is None or name in seen:
        return value
    return _resolve(macros().get(name, gin.REQUIRED), seen + (name,))


def check_required_macros() -> None:
    """Raise if a macro read somewhere is still `%gin.REQUIRED`."""
    bound = macros()
    missing = sorted(name for name, value in bound.items()
                     if _macro_name(value) == "gin.REQUIRED" and _is_read(name))
    if missing:
        raise GinBindingError(
            f"{', '.join(missing)} must be set: the gin files mark "
            f"{'it' if len(missing) == 1 else 'them'} %gin.REQUIRED; give "
            + " ".join(f"--gin.{name}=VALUE" for name in missing)
            + " (strings in quotes: --gin.MODEL_DIR=\"'/tmp/run'\")")


def _readers() -> set[str]:
    read = set()
    for params in _config().values():
        for value in params.values():
            read.update(_references(value))
    return read


def _is_read(name: str) -> bool:
    return name in _readers()


def check_unused_macros(bindings: Sequence[str]) -> None:
    """Raise if a macro bound in `bindings` (the command line's, "NAME=VALUE") is read by no
    configurable and no other macro."""
    bound, read = macros(), _readers()
    for binding in bindings:
        name = binding.partition("=")[0].strip()
        if "." in name or "/" in name or name not in bound or name in read:
            continue  # a parameter binding (gin checks those), or a macro that is read
        close = difflib.get_close_matches(name, sorted(read), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise GinBindingError(
            f"--gin.{binding}: no configurable reads the macro {name}; {hint}the macros these "
            f"gin files read are {', '.join(sorted(read))}")


def _fits(value, hint) -> bool:
    if hint is typing.Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin is not None and isinstance(origin, type):
        return isinstance(value, origin)
    return True  # classes and protocols: left to the function


def check_value_types() -> None:
    """Raise if a literal bound (directly or through macros) to a parameter does not fit the
    parameter's annotation."""
    for (scope, selector), params in _config().items():
        if selector == MACRO:
            continue
        configurable = gin.config._REGISTRY.get_match(selector)
        if configurable is None:
            continue
        try:
            hints = typing.get_type_hints(configurable.wrapped)
        except Exception:  # annotations that do not evaluate here are not checked
            continue
        for param, value in params.items():
            resolved = _resolve(value)
            if param not in hints or isinstance(resolved, gin.config.ConfigurableReference) \
                    or resolved is gin.REQUIRED:
                continue
            if not _fits(resolved, hints[param]):
                where = f"{scope}/" if scope else ""
                via = f" = %{_macro_name(value)}" if _macro_name(value) else ""
                expected = str(hints[param]).replace("NoneType", "None")
                if isinstance(hints[param], type):
                    expected = hints[param].__name__
                fix = f"--gin.{_macro_name(value)}=VALUE" if via else "a value of that type"
                raise GinBindingError(
                    f"{where}{configurable.selector}.{param}{via} = {resolved!r}: expected "
                    f"{expected}; bind {fix}")
