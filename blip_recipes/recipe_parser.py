"""`[RECIPE.yaml] [--key value ...]` -> a validated Recipe (config.py's three dataclasses).

One argparse parser knows every recipe key, with its help text (`blip-recipes train --help` lists them all), so
`--key value` and `--key=value` work the same everywhere and an unknown key fails naming the closest valid one.
YAML is read with `yaml.safe_load` only. Values from the file and the command line are coerced to the field's type
by one set of rules (`coerce`); a `Literal` field accepts exactly its choices.
"""

import argparse
import dataclasses
import difflib
import enum
import re
import types
import typing

import yaml

from .config import (
    ARGUMENT_CLASSES,
    UNUSED_TRAINER_KEYS,
    CaptionTrainingArguments,
    Recipe,
    RecipeError,
    validate_recipe,
)

_GROUPS = {
    "ModelArguments": "model keys",
    "DataArguments": "data keys",
    "CaptionTrainingArguments": "training keys (Seq2SeqTrainingArguments + caption evaluation)",
}


@dataclasses.dataclass(frozen=True)
class RecipeKey:
    owner: type
    annotation: typing.Any
    help: str


def recipe_keys() -> dict[str, RecipeKey]:
    """Every key a recipe may set, in dataclass order."""
    keys = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.init:
                unused = UNUSED_TRAINER_KEYS.get(item.name)
                text = f"Not used here (refused): {unused}." if unused else item.metadata.get("help", "")
                if item.name == "do_train":  # recorded recipes hold its default, false: it cannot be refused
                    text = "Not used: `blip-recipes train` always trains (`blip-recipes evaluate` scores a model)."
                keys[item.name] = RecipeKey(cls, hints.get(item.name, item.type), text)
    return keys


class RecipeArgumentParser(argparse.ArgumentParser):
    """argparse that raises RecipeError instead of exiting, so callers report errors their own way."""

    def error(self, message: str):
        missing = message.partition(": expected one argument")
        if missing[1]:
            raise RecipeError(f"command line: {missing[0].removeprefix('argument ').split('/')[0]} needs a value")
        raise RecipeError(f"command line: {message}")


def recipe_argument_parser(
    prog: str, description: str = "", aliases: dict[str, list[str]] | None = None, usage: str | None = None
):
    """A parser with an optional RECIPE.yaml positional and one option per recipe key (plus `aliases`)."""
    aliases = aliases or {}
    parser = RecipeArgumentParser(
        prog=prog, usage=usage or f"{prog} [RECIPE.yaml] [--key value ...]", description=description,
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("recipe", nargs="?", help="YAML recipe; command-line keys override its values")
    groups = {}
    for name, key in recipe_keys().items():
        group = groups.get(key.owner)
        if group is None:
            group = groups[key.owner] = parser.add_argument_group(_GROUPS[key.owner.__name__])
        flags = [*aliases.get(name, []), f"--{name}"]
        is_bool = bool in _union_members(key.annotation)
        group.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=_metavar(key.annotation),
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=(key.help or "").replace("%", "%%") or None,
        )  # fmt: skip
    return parser


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader (no Python tags), plus: a key given twice in one mapping is an error, not last-one-wins."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key != "<<" and key in lines:
                raise RecipeError(f"{self.name}: key '{key}' appears twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_numbers(value):
    """YAML 1.1 (PyYAML) reads 1e-7 as text: a typed key is converted by its type, but inside a mapping (e.g.
    lr_scheduler_kwargs: {lr_end: 1e-7}) the text would reach the scheduler. Read it as the number YAML 1.2 and
    JSON read."""
    if isinstance(value, dict):
        return {key: _exponent_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_exponent_numbers(item) for item in value]
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def load_recipe_file(path: str) -> dict:
    """Read a UTF-8 recipe with yaml's safe loader; Python tags, duplicate keys and non-mapping documents are
    errors."""
    import os

    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at position {error.start}); save the recipe as "
            "UTF-8"
        ) from None
    loader = _RecipeLoader(text)
    loader.name = path
    try:
        values = loader.get_single_data()
    except yaml.constructor.ConstructorError as error:
        raise RecipeError(
            f"{path}: rejected YAML tag ({error.problem}); recipes are plain YAML, no Python tags"
        ) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    finally:
        loader.dispose()
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_recipe(argv: list[str], parser=None, defaults=None, machine: dict | None = None) -> Recipe:
    """`[RECIPE.yaml] [--key value ...]` -> Recipe. Command-line values override the file's.

    `parser`: a recipe_argument_parser (a command's own, with its aliases); `defaults(values) -> dict`: values for
    keys neither the file nor the command line set; `machine`: training defaults for this machine (machine.py's,
    when None).
    """
    from .machine import launcher_compile, launcher_precision, machine_defaults

    known = recipe_keys()
    parser = parser or recipe_argument_parser("blip-recipes train")
    namespace, unknown = parser.parse_known_args(_underscored(argv))
    for token in unknown:
        if token.startswith("--"):
            raise _unknown_key(token[2:].partition("=")[0], known, "command line", flag="--")
        raise RecipeError(f"command line: expected --key value, got {token!r}")
    raw_values = {key: raw for key, raw in vars(namespace).items() if key != "recipe"}
    overrides = {key: _cli_value(raw, known[key].annotation) for key, raw in raw_values.items()}

    path, values = getattr(namespace, "recipe", None), {}
    if path is not None:
        values = load_recipe_file(path)
        for key in values:
            if key not in known:
                raise _unknown_key(key, known, path)
    where = {key: (path, key) for key in values}
    values.update(overrides)
    where.update({key: ("command line", f"--{key}") for key in overrides})
    explicit = frozenset(values)
    for key, value in (defaults(values) if defaults else {}).items():
        values.setdefault(key, value)
        where.setdefault(key, ("default", key))

    kwargs: dict[type, dict] = {cls: {} for cls in ARGUMENT_CLASSES}
    coerced = {key: coerce(value, known[key].annotation, *where[key]) for key, value in values.items()}
    for key, value in coerced.items():
        kwargs[known[key].owner][key] = value
    for key, value in (machine_defaults() if machine is None else machine).items():
        kwargs[CaptionTrainingArguments].setdefault(key, value)
    launched, training_kwargs = launcher_precision(), kwargs[CaptionTrainingArguments]
    silent = launched not in explicit and not any(training_kwargs.get(key) for key in ("bf16", "fp16"))
    if launched in ("bf16", "fp16") and silent:
        # The Trainer trains in the launcher's mixed precision anyway: say so in the recipe, so the saved recipe, the
        # model card and this project's own autocasts agree (a recipe that says otherwise is refused, config.py).
        training_kwargs[launched] = True
    if training_kwargs.get("torch_compile", True):  # the same for torch.compile; an explicit key wins, as there
        for key, value in launcher_compile().items():
            training_kwargs.setdefault(key, value)
    source = path or "command line"
    built = [_construct(cls, kwargs[cls], source) for cls in ARGUMENT_CLASSES]
    given = {key: value for key, value in coerced.items() if key in explicit}
    recipe = Recipe(*built, path=path, values=given, overrides=overrides)
    validate_recipe(recipe)
    return recipe


def _underscored(argv: list[str]) -> list[str]:
    """--learning-rate -> --learning_rate (values untouched); `--key -1e-8` -> `--key=-1e-8`, since argparse takes
    only plain negative numbers (-1, -0.5) for values and would read -1e-8 or -inf as an option."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            token = "--" + key.replace("-", "_") + sep + value
        elif _is_negative_number(token) and out and out[-1].startswith("--") and "=" not in out[-1]:
            token = f"{out.pop()}={token}"
        out.append(token)
    return out


def _is_negative_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return token.startswith("-")


def _unknown_key(key: str, known, where: str, flag: str = "") -> RecipeError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{flag}{close[0]}'?)" if close else ""
    return RecipeError(f"{where}: unknown key '{flag}{key}'{hint}")


def _construct(cls, kwargs: dict, source: str):
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{source}: {error}") from None


def _cli_value(raw: str, annotation):
    members = [member for member in _union_members(annotation) if member is not type(None)]
    if raw in ("null", "None") and type(None) in _union_members(annotation):
        return None
    if str in members and list[str] in members and "," in raw and not raw.lstrip().startswith("["):
        return [part.strip() for part in raw.split(",") if part.strip()]  # --report_to tensorboard,wandb
    if (str in members or _is_literal(annotation)) and not raw.lstrip().startswith(("[", "{")):
        return raw  # a prompt like "yes", a run name like 2024 or eval_strategy "no" stays text
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def coerce(value, annotation, source: str, key: str):
    """Coerce a YAML/CLI value to `annotation`; raise RecipeError naming `source` and `key` when it cannot."""
    members = _union_members(annotation)
    where = f"{source}: {key}" if key.startswith("--") else f"{source}: key '{key}'"
    if value is None:
        if type(None) in members or annotation is typing.Any:
            return None
        raise RecipeError(f"{where}: null is not allowed here (expected {_type_name(annotation)})")
    for member in members:
        if member is type(None):
            continue
        try:
            return _coerce_one(value, member)
        except (TypeError, ValueError):
            continue
    if _is_literal(annotation):
        choices = ", ".join(str(choice) for choice in typing.get_args(annotation))
        raise RecipeError(f"{source}: {key.lstrip('-')} must be one of {choices}; got {value!r}")
    raise RecipeError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _coerce_one(value, annotation):
    origin = typing.get_origin(annotation)
    if annotation is typing.Any or annotation is object:
        return value
    if isinstance(value, bool) and (annotation is str or _is_enum(annotation) or _is_literal(annotation)):
        # YAML 1.1 reads an unquoted no/off as false: `eval_strategy: no` must still mean "no".
        value = "yes" if value else "no"
    if origin is typing.Literal:
        if isinstance(value, str) and value in typing.get_args(annotation):
            return value
        raise ValueError("not one of the choices")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1", "false", "no", "off", "0"}:
            return value.strip().lower() in {"true", "yes", "on", "1"}
        raise TypeError("not a boolean")
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (str, float)) else None
        if number is not None and number.is_integer():
            return int(number)
        raise TypeError("not an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        raise TypeError("not a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise TypeError("not a string")
    if _is_enum(annotation):
        return annotation(value).value if not isinstance(value, annotation) else value.value
    if origin is list or annotation is list:
        (item_type,) = typing.get_args(annotation) or (typing.Any,)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return [_coerce_one(item, item_type) for item in value]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return _exponent_numbers(value)
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else annotation(value)
    return value


def _union_members(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _is_enum(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def _is_literal(annotation) -> bool:
    return typing.get_origin(annotation) is typing.Literal


def _type_name(annotation) -> str:
    names = []
    for member in _union_members(annotation):
        if member is type(None):
            names.append("null")
        elif _is_literal(member):
            names.append("{" + ",".join(str(choice) for choice in typing.get_args(member)) + "}")
        elif typing.get_origin(member) is not None:
            names.append(str(member).replace("typing.", ""))
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(names)


def _metavar(annotation) -> str:
    name = _type_name(annotation).replace(" or null", "").replace(" ", "")
    return name if name.startswith("{") else name.upper()
