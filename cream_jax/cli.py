"""The absl CLIs' flag parsing (train, plan): a mistake in a flag is one `error:` line and exit 2, no traceback."""

from __future__ import annotations

import difflib
import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Print `error: message` (its first line) and exit 2, the usage-error status of every CLI here."""
    print(f"error: {message.strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, for `app.run(..., flags_parser=parse_flags)`: an unknown flag, a bad value, a
    missing or unreadable --config file or an unknown --config.* field exits 2 naming it."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a failed load shows at first use: here, not mid-run
        return rest
    except flags.Error as e:  # unknown flag or bad value: absl's message names the flag
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - anything raised while loading --config or applying --config.*
        fail(_explain(argv, e))


def _explain(argv: list[str], error: Exception) -> str:
    """Which --config argument `error` came from, and what would be right."""
    config_args = [a for a in argv[1:] if a.startswith("--config=") or a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in config_args if a.startswith("--config=")), None)
    if path is None:
        return "--config is required: a recipe file such as configs/tiny_cream.py"
    from pathlib import Path

    if not Path(path).is_file():
        return f"--config={path}: no such file (the recipes are in configs/)"
    from cream_jax import train_config as tc

    try:
        config = tc.load_config(path)
    except Exception as e:  # noqa: BLE001 - the recipe itself is broken: say so in one line
        return f"--config={path} does not load: {type(e).__name__}: {str(e).splitlines()[0]}"
    for arg in config_args:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, seen = config, []
        for part in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(seen) or "the config"
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean --config.{'.'.join([*seen, close[0]])}?" if close else (
                    f"; {where} has {', '.join(sorted(keys))}" if keys else f"; {where} is a value, not a section")
                return f"{arg}: {where} has no field {part!r}{hint}"
            node, seen = node[part], [*seen, part]
    return f"{' '.join(config_args)}: {type(error).__name__}: {error}"
