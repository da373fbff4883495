"""What opening a run may run: a run is data, and the code that rebuilds its network is chosen by the user.

A run (config.json, a checkpoint's "config") names its network. :func:`trusted_model` accepts the name when:

* it is registered in this process (:data:`fullres.nets.registry.MODELS`: unet3d, intel-unet, and whatever the
  user's own script registered), or a class of an allow-listed network library (``monai:CLASS`` from
  ``monai.networks.nets``, ``nnunet:PlainConvUNet`` / ``nnunet:ResidualEncoderUNet`` from
  dynamic-network-architectures): code that is already installed, chosen by name only;
* it is a ``FILE.py:FUNCTION`` factory whose source `train` copied into the run (``RUN/network/FILE.py``),
  whose SHA-256 the run records and matches, and which this user trusts: they trained with it on this
  account (`train` remembers the SHA-256 in :func:`store_path`, a file of the user's, never of a run), or they
  say ``--trust-code`` on their own command line. It is loaded from the run's copy alone, never from the
  path the run recorded or from the current folder;
* it is a ``package.module:FUNCTION`` factory that this user trained with, its package found where it was
  then (not, say, in the current folder), or with ``--trust-code``.

Anything else is refused in one line before anything is imported. The checkpoint itself is loaded with
``weights_only=True`` (no pickled code), and its fields are checked by :mod:`fullres.schema`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

from fullres.errors import UserError
from fullres.files import write_bytes_atomically
from fullres.nets import families
from fullres.nets.registry import MODELS, ModelConfig

FACTORY_FOLDER = "network"  # RUN/network/FILE.py: the run's copy of its factory's source
STORE_FILE = "trusted-factories.json"


def store_path() -> Path:
    """The user's record of the factories they trained with: $XDG_CONFIG_HOME/fullres/trusted-factories.json
    (else ~/.config/fullres/...). Written by `train`, read when a run is opened; never inside a run."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "fullres" / STORE_FILE


def _store() -> dict:
    try:
        data = json.loads(store_path().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _key(model: ModelConfig) -> str:
    """A file factory by its content and function (its file name may differ between machines: a trusted
    file does not make its other functions trusted), a module factory by its name."""
    if families.factory_file(model.architecture) is not None:
        return f"sha256:{model.source_sha256}:{model.architecture.rpartition(':')[2]}"
    return f"module:{model.architecture}"


def _module_origin(name: str) -> str | None:
    """Where the top-level package of a module factory `name` would be imported from now (found, not
    imported: nothing runs), or None when it is not found."""
    top = name.rpartition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return str(spec.origin or (list(spec.submodule_search_locations or [None])[0]))


def remember(model: ModelConfig) -> None:
    """Record that this user trains with `model`'s factory (no-op for other networks). A home that cannot be
    written leaves it unrecorded: opening the run then needs --trust-code."""
    if not is_factory(model) or (families.factory_file(model.architecture) is not None and not model.source_sha256):
        return
    entries = _store()
    path = families.factory_file(model.architecture)
    # a module factory is trusted where its package was found when the user trained with it, not elsewhere
    entries[_key(model)] = model.architecture if path is not None else {"origin": _module_origin(model.architecture)}
    try:
        write_bytes_atomically(store_path(), (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode())
    except OSError:
        pass


def is_factory(model: ModelConfig) -> bool:
    return model.architecture not in MODELS and families.is_factory_name(model.architecture)


def copy_factory_source(model: ModelConfig, run_dir: Path) -> None:
    """At train time: the factory file's source into RUN/network/ (atomic; the bytes whose SHA-256 the run
    records). Nothing for other networks."""
    path = families.factory_file(model.architecture) if is_factory(model) else None
    if path is None:
        return
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != model.source_sha256:
        raise UserError(f"--model {model.architecture}: {path} changed while the run was being set up")
    write_bytes_atomically(run_dir / FACTORY_FOLDER / path.name, source)


def trusted_model(model: ModelConfig, run_dir: Path, trust_code: bool, where: Path) -> ModelConfig:
    """`model` (read from the run in `run_dir`; `where` is the file it came from) as it may be built here: a
    file factory pointed at the run's own copy. UserError naming `where` when the run names code this user
    has not trusted (see the module docstring); nothing is imported."""
    if not is_factory(model):
        return model  # a registered name or an allow-listed library's class
    path = families.factory_file(model.architecture)
    recorded = _store().get(_key(model))
    if path is None:  # package.module:FUNCTION: code the run names by import path
        origin = recorded.get("origin") if isinstance(recorded, dict) else None
        trusted = trust_code or (origin is not None and origin == _module_origin(model.architecture))
        if not trusted:
            raise UserError(f"{where}: the run's network is the factory {model.architecture}, code that fullres does "
                            "not import for a run: give --trust-code if you trust it")
        return model
    copy = run_dir / FACTORY_FOLDER / path.name
    if not model.source_sha256 or not copy.is_file():
        raise UserError(f"{where}: the run's network {model.architecture} has no recorded copy in the run "
                        f"({FACTORY_FOLDER}/{path.name} with its SHA-256): fullres loads no other code for a run")
    if not (trust_code or recorded is not None):
        raise UserError(f"{where}: the run's network is code ({FACTORY_FOLDER}/{path.name}, SHA-256 "
                        f"{model.source_sha256[:12]}...) that was not trained on this account: read it, then give "
                        "--trust-code to run it")
    return replace(model, factory_dir=str(copy.parent.absolute()))
