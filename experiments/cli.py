"""Command lines over the experiments' frozen config dataclasses: one flag per field, presets of defaults.

    parser = config_parser(Config, "what the script does", presets=PRESETS, smoke_flag=True)
    cfg = parse_config(parser, Config, argv, presets=PRESETS)

A field `num_heads: int` becomes `--num-heads N`, `seq_lens: tuple[int, ...]`
becomes `--seq-lens N [N ...]`, a bool becomes `--flag / --no-flag`. With
presets, `--preset NAME` swaps in that preset's defaults (explicit flags still
win); `smoke_flag` adds `--smoke` for `--preset smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str}


def config_parser(cls: type, description: str, *, presets: dict[str, dict[str, Any]] | None = None,
                  smoke_flag: bool = False) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description)
  if presets:
    parser.add_argument("--preset", choices=tuple(presets), default=next(iter(presets)),
                        help="a set of defaults (explicit flags still win): " +
                        "; ".join(f"{k}: {v or 'the defaults'}" for k, v in presets.items()))
  if smoke_flag:
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke")
  for field in dataclasses.fields(cls):
    flag = "--" + field.name.replace("_", "-")
    if field.type == "bool":
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
    elif field.type.startswith("tuple["):  # "tuple[int, ...]"
      parser.add_argument(flag, type=_SCALARS[field.type[len("tuple["):-len(", ...]")]], nargs="+",
                          default=field.default)
    else:
      parser.add_argument(flag, type=_SCALARS[field.type], default=field.default)
  return parser


def parse_config(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None = None, *,
                 presets: dict[str, dict[str, Any]] | None = None) -> Any:
  """`cls(**flags)`, lists as tuples, after applying the chosen preset's defaults."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if presets:
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**presets["smoke" if getattr(known, "smoke", False) else known.preset])
  args = vars(parser.parse_args(argv))
  args.pop("preset", None), args.pop("smoke", None)
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
