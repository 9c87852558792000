"""Which models to serve at start, installing missing ones from a signed registry.

The registry path is kept to :func:`install_from_registry`: it fetches a bundle through
``agent.updates.client.RegistryClient`` (TUF: the bundle's hash and length are checked
against signed targets metadata, with the trusted root at ``STATE/tuf/metadata/root.json``)
and hands the verified file to the repository's install (manifest hashes, golden vectors).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError, NotFoundError
from agent.inference.repository import ModelRepository
from agent.inference.store import InstalledModel

__all__ = ["ensure_models", "install_from_registry", "parse_model_spec"]

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME"`` -> (NAME, None); ``"NAME@1.2.0"`` -> (NAME, "1.2.0").

    Raises:
        ConfigError: an empty name or version.
    """
    name, sep, version = spec.partition("@")
    if not name or (sep and not version):
        raise ConfigError(f"model {spec!r}: expected NAME or NAME@VERSION")
    return name, version or None


def install_from_registry(repo: ModelRepository, state_dir: Path, sources: tuple[str, ...],
                          name: str, version: str | None) -> InstalledModel:
    """Download ``name`` (at ``version``, else the newest) from the first source that has it,
    verify it (TUF, then manifest hashes and golden vectors) and install it (blocking).

    Raises:
        ConfigError: no registry source is configured.
        NotFoundError: no source offers that bundle.
        VerificationError, RegistryError, BundleError: the bundle was refused.
    """
    if not sources:
        raise ConfigError(f"model {name!r} is not installed and no registry source is configured "
                          "(--registry URL|DIR or [updates] sources)")
    # TUF and urllib3 load here, not with the agent (issue #14: its way to SERVING needs neither)
    from agent.updates.client import RegistryClient

    last: Exception | None = None
    for source in sources:
        client = RegistryClient(state_dir, source)
        try:
            client.refresh()
            target = client.find_bundle(name, version)
        except NotFoundError as exc:
            last = exc
            continue
        with tempfile.TemporaryDirectory(prefix="bundle-", dir=state_dir) as tmp:
            path = client.download(target, Path(tmp))
            installed = repo.install(Path(path))
        log.info("installed %s %s from %s", installed.name, installed.version, source)
        return installed
    raise NotFoundError(f"model {name}{'@' + version if version else ''}: no registry source "
                        f"offers it ({last})")


async def ensure_models(repo: ModelRepository, config: AgentConfig) -> list[tuple[str, str | None]]:
    """The (name, version) pairs to load, installing named models that are missing.

    With no models configured: every installed model's active version.

    Raises:
        ConfigError, NotFoundError, VerificationError, ...: a named model cannot be provided.
    """
    specs = [parse_model_spec(s) for s in config.inference.models]
    if not specs:
        return sorted({(m.name, None) for m in repo.store.installed()}, key=lambda p: p[0])
    loop = asyncio.get_running_loop()
    for name, version in specs:
        try:
            repo.store.find(name, version)
        except NotFoundError:
            await loop.run_in_executor(None, install_from_registry, repo, config.server.state_dir,
                                       config.updates.sources, name, version)
    return specs
