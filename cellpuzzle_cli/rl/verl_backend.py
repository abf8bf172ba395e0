"""verl backend: compose and check verl's own Hydra config, then run `verl.trainer.main_ppo`.

The dry run composes verl's `ppo_trainer` config with our overrides in this process and runs
verl's `validate_config`, so a misspelt key or an inconsistent batch size fails on the
laptop, not on the cluster. The real run is the same override list handed to
`python -m verl.trainer.main_ppo` as an argument list, in its own process session (Ray can
hang rather than fail, and then the whole session is stopped); its log streams through and its
exit code is ours.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError

CONFIG_NAME = "ppo_trainer"


@dataclass
class VerlPlan:
    command: list[str]
    overrides: list[str]
    config: dict[str, Any]
    validated: bool
    notes: list[str]


def config_dir() -> Path:
    try:
        import verl
    except ImportError as exc:
        raise UserError("verl is not installed, so the verl backend cannot run or check its "
                        "config. Install it with `pip install 'cellpuzzle[verl]'`, or use "
                        "--backend trl on one machine.") from exc
    return Path(verl.__file__).resolve().parent / "trainer" / "config"


# -- composing and validating -----------------------------------------------------------------

def _leaf_keys(cfg: Any, prefix: str = "") -> Iterator[str]:
    from omegaconf import DictConfig

    for key in cfg:
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig):
            yield name
            yield from _leaf_keys(node, name + ".")
        else:
            yield name


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(CONFIG_NAME, overrides=overrides)


def _key_error(message: str, overrides: list[str]) -> UserError:
    match = re.search(r"override '([^']+)'", message) or re.search(r"[Kk]ey '([^']+)'", message)
    key = match.group(1) if match else None
    hint = ""
    if key:
        base = list(_leaf_keys(_compose([])))
        close = difflib.get_close_matches(key.lstrip("+~"), base, n=3, cutoff=0.75)
        if close:
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
    first_line = message.strip().splitlines()[0]
    named = f"'{key}'" if key else "an override"
    return UserError(f"verl's config (verl/trainer/config/{CONFIG_NAME}.yaml) rejects {named}: "
                     f"{first_line}.{hint} Keys are verl's own dotted names; prefix a key with "
                     "'+' only to add one verl does not define.")


def compose_config(overrides: list[str]) -> Any:
    """verl's ppo_trainer config with our overrides; unknown keys become a UserError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _key_error(str(exc), overrides) from exc


def validate(cfg: Any, lenient_models: bool = False) -> list[str]:
    """verl's own checks that need no GPU (batch divisibility, micro-batch settings, dataclasses)."""
    import warnings

    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    notes = []
    try:
        OmegaConf.to_container(cfg, resolve=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                validate_config(cfg, use_reference_policy=need_reference_policy(cfg),
                                use_critic=need_critic(cfg))
        notes += [str(w.message) for w in caught if "critic" in str(w.message).lower()]
    except (AssertionError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"verl's config validation rejects these settings: {exc}. Fix the "
                        "key named there in your config or overrides.") from exc
    except Exception as exc:
        from hydra.errors import InstantiationException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(exc, InstantiationException):
            # verl builds its config dataclasses here; model configs read the model folder
            where = re.search(r"full_key: (\S+)", str(exc))
            section = where.group(1) if where else "the config"
            if lenient_models and section.endswith("model"):
                return [*notes, (f"verl's {section} checks were skipped: the model path is a "
                                 "placeholder.")]
            cause = str(exc.__cause__ or exc).strip().rstrip(".")
            raise UserError(f"verl rejects the settings under {section}: {cause}. Fix that "
                            "key in your config or overrides (for *.model sections, check the "
                            "model path).") from exc
        if isinstance(exc, OmegaConfBaseException):
            raise UserError(f"verl's config does not resolve: {exc}".strip()) from exc
        raise
    return notes


def plan(overrides: list[str], check: bool = True, lenient_models: bool = False,
         cfg: Any = None) -> VerlPlan:
    """The command to run, after composing (and, with `check`, validating) verl's config.

    `cfg` is the config already composed from `overrides`, if the caller has it.
    """
    from omegaconf import OmegaConf

    cfg = compose_config(overrides) if cfg is None else cfg
    notes = validate(cfg, lenient_models) if check else []
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides]
    return VerlPlan(command=command, overrides=overrides,
                    config=OmegaConf.to_container(cfg, resolve=False), validated=check, notes=notes)


TIMEOUT_EXIT = 124  # as coreutils' `timeout` reports a command it had to stop
STOP_GRACE_S = 10.0


def _stop(proc: subprocess.Popen) -> None:
    """Stop verl and everything in its session (Ray's processes included): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run(command: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None,
        watch: Callable[[float], str | None] | None = None, timeout_s: float | None = None,
        poll_s: float = 2.0) -> int:
    """Run verl with its log on our stdout/stderr; returns its exit code.

    verl runs in a new process session. Every `poll_s`, `watch(now)` may return a failure
    message: verl's session is stopped and the message raised as a UserError. After
    `timeout_s` the session is stopped and TIMEOUT_EXIT returned.
    """
    proc = subprocess.Popen(command, cwd=cwd, env=None if env is None else dict(env),
                            start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            try:
                return proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            problem = watch(now) if watch else None
            if problem:
                _stop(proc)
                raise UserError(problem)
            if timeout_s is not None and now - started > timeout_s:
                _stop(proc)
                return TIMEOUT_EXIT
    except KeyboardInterrupt:
        _stop(proc)
        return 130
    except SystemExit:  # SIGTERM (see cli.main): verl's session goes down with us
        _stop(proc)
        raise
