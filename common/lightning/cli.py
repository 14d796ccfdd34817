"""`LungCLI`: the LightningCLI the three package commands (`lungdet`, `lungseg`, `lungcls`) share.

What it adds to LightningCLI:
- subclass mode for model and data, so a YAML names any task/datamodule by `class_path`;
- `omegaconf` parser mode, so configs may use `${...}` interpolation and `${oc.env:LUNA16_ROOT}`;
- the resolved config and run info written into the run folder (`RunConfigSaver`);
- when the config names no logger, CSV (always) plus wandb with its mode from WANDB_MODE, in
  `<trainer.default_root_dir>/<run_name>` — `run_name` defaults to the first config file's stem;
- seed 0 by default, so two identical commands train identical weights on CPU;
- user errors in one line (`run_main`): a missing or damaged ``--ckpt_path`` is refused before any data is
  read or any run folder made, and a misspelled config key names the key, where it was written (command
  line, or YAML file and line) and the closest valid keys, instead of the whole usage text.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from common.lightning.callbacks import RunConfigSaver
from common.lightning.loggers import default_loggers
from common.runtime import keep_freed_memory

#: ``--ckpt_path`` values that Lightning resolves itself (no file to check here).
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


class CommandLineError(ValueError):
    """A command-line or config problem, already phrased as one line for the user."""


def check_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> Path:
    """Refuse a missing or damaged checkpoint up front, in one line naming it (SPEC §9).

    A Lightning checkpoint is a zip archive (``torch.save``); a file cut short loses the archive's
    directory at its end, random bytes have none. The archive's CRCs are checked, then the file is loaded
    with ``weights_only=True`` (memory-mapped, so tensors are not read), which is how Lightning loads it.
    """
    import torch

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: checkpoint not found ({flag}); give the path of a .ckpt file, e.g. "
            "runs/<run>/version_N/checkpoints/last.ckpt"
        )
    if path.is_dir():
        raise CommandLineError(f"{path}: {flag} is a folder; give a .ckpt file inside it")
    damaged = (
        f"{path}: not a readable checkpoint ({flag}); the file is truncated, overwritten or not a "
        f"Lightning checkpoint; copy it again or point {flag} at another .ckpt"
    )
    if not zipfile.is_zipfile(path):
        raise CommandLineError(damaged)
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise CommandLineError(damaged)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CommandLineError(damaged) from err
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        if "Unsupported global" in str(err):  # a class outside the safe list, not damage
            raise CommandLineError(
                f"{path}: the checkpoint holds Python objects that safe loading refuses ({flag}); re-save it "
                "with this version of the toolkit (trainer.save_checkpoint) or use a checkpoint you trust that "
                "loads safely"
            ) from None
        raise CommandLineError(damaged) from None
    return path


def _config_files(args: Sequence[str]) -> list[Path]:
    """The ``--config`` / ``-c`` files of an argument list, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _where(key: str, args: Sequence[str]) -> str:
    """Where a config key was written: on the command line, or the YAML file and line."""
    last = key.rsplit(".", 1)[-1]
    for arg in args:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and (name[2:] == key or name.endswith("." + last)):
            return "on the command line"
    pattern = re.compile(rf"^\s*{re.escape(last)}\s*:")
    for path in reversed(_config_files(args)):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for number, line in enumerate(lines, start=1):
            if pattern.match(line):
                return f"in {path}:{number}"
    return "in the config"


def _init_parameters(class_path: str) -> list[str]:
    """Constructor parameter names of a class and, through ``**kwargs``, of its bases."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [
            p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return "; did you mean " + " or ".join(close) + "?" if close else ""


def class_refusal(message: str) -> str | None:
    """The message of a class's own ``__init__`` refusal that jsonargparse wrapped in its ``class_path`` union
    error (the first of the union's errors: already one line naming the option and the fix), else None."""
    refused = re.search(
        r"Does not validate against any of the Union subtypes.*?Errors:\s*-\s*(.+?)\s+-\s+Expected a <class "
        r"'NoneType'>",
        message,
        re.S,
    )
    if refused is None or refused.group(1).startswith("Expected a "):  # a plain type mismatch, not a refusal
        return None
    return " ".join(refused.group(1).split())


def explain_parser_error(message: str, args: Sequence[str], options: Sequence[str] = ()) -> str:
    """jsonargparse's multi-line error as one line: the key, where it was written, the closest valid keys."""
    typo = re.search(
        r"class_path '([\w.]+)':\s*(?:Option|Key) '([\w.]+)' is not (?:accepted|expected)", message
    )
    section = re.search(r'Parser key "([\w.]+)"', message)
    if typo:
        class_path, key = typo.groups()
        full = f"{section.group(1)}.init_args.{key}" if section else key
        return (
            f"unknown config key {full} {_where(full, args)} ({class_path.rsplit('.', 1)[-1]} has no "
            f"argument {key!r}){_suggest(key, _init_parameters(class_path))}"
        )
    unknown = re.search(r"unrecognized arguments: (--[\w.-]+)", message)
    if unknown:
        flag = unknown.group(1)
        flags = [o for o in options if o.startswith("--")]
        close = difflib.get_close_matches(flag, flags, n=3, cutoff=0.75)
        hint = "; did you mean " + " or ".join(close) + "?" if close else ""
        return f"unknown option {flag} on the command line{hint}"
    unexpected = re.search(r"Key '([\w.]+)' is not expected|does not accept option '([\w.]+)'", message)
    if unexpected:
        key = unexpected.group(1) or unexpected.group(2)
        flags = [o[2:] for o in options if o.startswith("--")]
        return f"unknown config key {key} {_where(key, args)}{_suggest(key, flags)}"
    given = re.search(r"Given value: (.*)", message)
    if section and given:
        expected = re.findall(r"Expected a <class '(\w+)'>", message)
        wanted = f" (expected {' or '.join(expected)})" if expected else ""
        key = section.group(1)
        return f"invalid value {given.group(1).strip()!r} for {key} {_where(key, args)}{wanted}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return " ".join(lines)[:400]


class OneLineErrorParser(LightningArgumentParser):
    """A LightningArgumentParser whose errors reach the user as one line (`run_main`) instead of ~45 lines
    of usage; ``--help`` still prints the full usage."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in parser._actions for o in action.option_strings]
        raise _ParserError(message, options)


class _ParserError(Exception):
    def __init__(self, message: str, options: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.options = options


def run_main(command: str, run: Callable[[list[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a method CLI; user errors (ValueError, FileNotFoundError) print one line and exit 2.

    ``LUNGCAD_TRACEBACK=1`` re-raises them with the traceback, for debugging.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        run(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    except (FileNotFoundError, ValueError) as err:
        if os.environ.get("LUNGCAD_TRACEBACK"):
            raise
        sub = args[0] if args and not args[0].startswith("-") else ""
        text = " ".join(str(err).split()) if str(err) else type(err).__name__
        text = class_refusal(text) or text
        print(f"{command}{' ' + sub if sub else ''}: error: {text}", file=sys.stderr)
        return 2
    return 0


class LungCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults (see module docstring)."""

    def __init__(
        self,
        model_class: type[LightningModule] | None = None,
        datamodule_class: type[LightningDataModule] | None = None,
        *,
        package: str = "lungcad",
        args: ArgsType = None,
        **kwargs: Any,
    ) -> None:
        self.package = package
        keep_freed_memory()
        parser_kwargs = kwargs.pop("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_class", OneLineErrorParser)
        self._argv = (
            [a for a in (sys.argv[1:] if args is None else args) if isinstance(a, str)]
            if (args is None or isinstance(args, list | tuple))
            else []
        )
        super().__init__(
            model_class,
            datamodule_class,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=parser_kwargs,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="run folder name under trainer.default_root_dir (default: the first --config file's stem)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, turning jsonargparse's usage-plus-error into one line (see `explain_parser_error`)."""
        try:
            super().parse_arguments(parser, args)
        except _ParserError as err:
            raise CommandLineError(explain_parser_error(err.message, self._argv, err.options)) from None

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first, before any dataset is read or run folder made (SPEC §9)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and not (
                str(ckpt_path) in _CKPT_ALIASES
                or str(ckpt_path).startswith("registry:")
                or "://" in str(ckpt_path)
            ):
                check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def _run_name(self) -> str:
        config = self.config.get(str(self.subcommand), self.config)
        if config.get("run_name"):
            return str(config["run_name"])
        files = config.get("config") or []
        for item in files:
            path = getattr(item, "relative", None) or getattr(item, "absolute", None) or item
            if path:
                return Path(str(path)).stem
        return self.package

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            root = trainer_config.get("default_root_dir") or "runs"
            kwargs["logger"] = default_loggers(
                save_dir=str(root), name=self._run_name(), project=self.package
            )
        return super().instantiate_trainer(**kwargs)
