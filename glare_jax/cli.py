"""One command-line behaviour for every program (docs/DESIGN.md, "Command line").

absl flags everywhere, so `--help` reads the same. A bad flag, config field or
input is one `error: ...` line on stderr and exit code 2, before anything is
written; the traceback only with `-v 1`.

    cli.run(main)                     # programs on absl's global FLAGS
    fv = cli.flag_values()            # programs that define their flags in main()
    rest = cli.parse(fv, argv, prog="python -m glare_jax.embed", doc=__doc__)
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

EXIT_BAD_INPUT = 2


class BadInput(Exception):
  """An input failed its check; the message names the file or field and the fault."""


def verbosity(argv: Sequence[str]) -> int:
  """The `-v N` / `--verbosity=N` of `argv` (flags may not have parsed)."""
  level = 0
  for i, a in enumerate(argv):
    m = re.fullmatch(r"--?(?:v|verbosity)(?:=(-?\d+))?", a)
    if m:
      value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "0")
      try:
        level = int(value)
      except ValueError:
        pass
  return level


def fail(message: Any, *, verbose: bool = False) -> NoReturn:
  """Prints `error: message` (and the current traceback when `verbose`); exits 2."""
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_BAD_INPUT)


def report(error: BaseException, *, verbose: bool = False) -> int:
  """`fail` for a program that returns its exit code: prints, returns 2."""
  if verbose:
    traceback.print_exception(error)
  print(f"error: {error}", file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def _flatten(d: Any, prefix: str = "") -> list[str]:
  if hasattr(d, "items"):
    out = []
    for k, v in d.items():
      out += _flatten(v, f"{prefix}{k}.")
    return out or [prefix[:-1]]
  return [prefix[:-1]]


def _load_config(argv: Sequence[str], name: str) -> Any:
  """The config of `--name=FILE[:ARG]` in `argv`, without overrides (None if it fails)."""
  for a in argv:
    if a.startswith(f"--{name}="):
      path, _, arg = a.split("=", 1)[1].partition(".py:")
      path = path if path.endswith(".py") else path + ".py"
      try:
        spec = importlib.util.spec_from_file_location(f"_{name}_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
      except Exception:  # pylint: disable=broad-except   # told by the flag's own error
        return None
  return None


def unknown_config_field(argv: Sequence[str], fv: flags.FlagValues) -> str | None:
  """'unknown config field ...; closest: ...' for the first `--config.X=` naming no field."""
  for a in argv:
    m = re.fullmatch(r"--([A-Za-z_]\w*)\.([\w.]+)(=.*)?", a)
    if not m or m.group(1) not in fv:
      continue
    config = _load_config(argv, m.group(1))
    if config is None or not hasattr(config, "items"):
      return None
    known = _flatten(config)
    if m.group(2) not in known:
      close = difflib.get_close_matches(m.group(2), known, n=3, cutoff=0.5)
      hint = f"closest: {', '.join(close)}" if close else "none is close"
      return (f"unknown config field --{m.group(1)}.{m.group(2)} ({hint}); "
              f"`--helpfull` lists the flags")
  return None


def _flag_error(e: BaseException, argv: Sequence[str], fv: flags.FlagValues) -> str:
  """The one line that says what is wrong with the command line."""
  message = unknown_config_field(argv, fv)
  if message:
    return message
  text = " ".join(str(e).split())
  if m := re.search(r"Flag (--[\w.-]+) must have a value other than None", text):
    return f"{m.group(1)} is required; `--help` lists the flags"
  # A config file that failed to load: ml_collections wraps the cause in prose.
  m = re.search(r"(\[Errno 2\][^:]*: '[^']+'|(?:ValueError|KeyError|TypeError): .*)", text)
  return m.group(1) if m else text


def parse_flags(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`fv(argv)`; a bad flag or `--config.X` override exits with one error line."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    try:
      fv(list(argv))            # absl prints the help and exits 1; a help is no error
    except SystemExit:
      raise SystemExit(0) from None
  try:
    rest = fv(list(argv))
    for value in fv.flag_values_dict().values():
      if type(value).__name__ == "_ErrorConfig":   # a config file that failed to load
        value.to_dict()                            # raises its error
    return rest
  except Exception as e:  # pylint: disable=broad-except   # flags.Error, config overrides
    fail(_flag_error(e, argv, fv), verbose=verbosity(argv) >= 1)


def run(main: Callable[[list[str]], Any]) -> None:
  """absl's app.run with the error behaviour above; `BadInput` from `main` exits 2."""
  def guarded(argv):
    try:
      return main(argv)
    except (BadInput, app.UsageError) as e:
      fail(e, verbose=verbosity(sys.argv) >= 1)
  app.run(guarded, flags_parser=parse_flags)


def flag_values() -> flags.FlagValues:
  """A program's own FlagValues (flags defined in its main()), with `-v`."""
  fv = flags.FlagValues()
  flags.DEFINE_integer("verbosity", 0, "1 shows the traceback of an error.", short_name="v",
                       flag_values=fv)
  return fv


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str | None,
          positional: str = "") -> list[str]:
  """Parses `argv` (without the program name; None: sys.argv[1:]) into `fv`.

  `--help` prints `doc` and the flags and exits 0; returns the positional
  arguments, which are refused unless `positional` names them.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv):
    usage = f"usage: {prog} [flags]" + (f" {positional}" if positional else "")
    print(f"{(doc or '').strip()}\n\n{usage}\n\nflags:\n{fv.get_help()}")
    raise SystemExit(0)
  rest = parse_flags([prog, *argv], fv)[1:]
  if rest and not positional:
    fail(f"unexpected arguments {rest}; `{prog} --help` lists the flags")
  return rest
