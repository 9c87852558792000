"""The model repository: which installed models are served, and the read API other parts use.

Published as ``ctx.inference``.  Read API (safe from any thread):

- :meth:`ModelRepository.installed` -> list of dicts: name, version, sha256, length,
  installed_at, active, loaded, provider (inventory reads this);
- :meth:`ModelRepository.statistics` -> list of dicts in Triton's ModelStatistics shape plus
  ``pending`` (the Prometheus collector reads this);
- :meth:`ModelRepository.index` -> (name, version, state, reason) of every installed version;
- :meth:`ModelRepository.triton_version` -> a version's Triton number (see
  :mod:`agent.inference.versions`); every lookup takes either form.

A model is served only after its installed files re-check against their manifest and its
golden vectors reproduce on the very session that will serve it; otherwise it is recorded
as UNAVAILABLE with the reason, and never answers a request.

Generative bundles (LLMs, text encoders) live in the same store and pass the same steps
(their golden check: greedy token ids, or embedding vectors); once loaded they are served
through :attr:`ModelRepository.generative`, the :class:`~agent.llm.types.GenerativeModels`
the OpenAI-compatible and streaming front ends ask.  Updates and rollbacks switch them the
way they switch tensor models (:meth:`ModelRepository.install_for_serving`,
:meth:`ModelRepository.stage`, :meth:`ModelRepository.swap`): the model object whose golden
check passed is the one that serves, and streams already running finish on the old one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import GoldenCase, Manifest, check_golden
from agent.config import InferenceSection
from agent.errors import ApplianceError, BundleError, NotFoundError, echo
from agent.inference.isolated import check_installed, stage_install
from agent.inference.model import LoadedModel, build_session
from agent.inference.signature import check_signature
from agent.inference.store import InstalledModel, ModelStore, golden_verifier
from agent.inference.versions import FILE_NAME, TritonVersions, is_number
from agent.llm.bundle import GenManifest, is_generative_bundle, read_gen_manifest
from agent.llm.installed import GenerativeModel, open_model
from agent.llm.installed import check_golden as check_generative_golden
from agent.llm.served import ServedGenerative, drain_generative
from agent.modelrefs import ModelCheck, fixed_cost

__all__ = ["IndexEntry", "ModelRepository", "Servable"]

log = logging.getLogger(__name__)

# Called with (model name, serving) when a model starts or stops being served.
Listener = Callable[[str, bool], None]

# A version loaded and checked (its golden check passed on this very object), not yet served:
# what an update or rollback switches to.
Servable = LoadedModel | GenerativeModel


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE
    reason: str


class ModelRepository:
    """Served models over a :class:`ModelStore`; see the module docstring."""

    def __init__(self, store: ModelStore, settings: InferenceSection) -> None:
        self.store = store
        self.settings = settings
        self._served: dict[str, dict[str, LoadedModel]] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()
        self.numbers = TritonVersions(store.root / FILE_NAME)
        self.generative = ServedGenerative()
        self._generative_versions: dict[str, str] = {}  # served generative name -> version

    @classmethod
    def for_state_dir(cls, state_dir: Path, settings: InferenceSection) -> ModelRepository:
        return cls(ModelStore(state_dir), settings)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(name, serving)`` whenever a model starts or stops being served."""
        self._listeners.append(listener)

    def _notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            try:
                listener(name, serving)
            except Exception:
                log.exception("model listener failed for %s", name)

    # ------------------------------------------------------------------ install

    def _session(self, model: bytes, manifest: Manifest, model_dir: Path | None = None,
                 checked: ModelCheck | None = None) -> Any:
        session = build_session(model, manifest, self.settings.providers, self.settings.intra_op_threads,
                                model_dir, checked=checked)
        check_signature(manifest, session)  # before any golden vector runs on it
        return session

    def install(self, bundle_path: Path, *, activate: bool = True) -> InstalledModel:
        """Install a bundle file that already passed signature verification (blocking).

        The golden vectors run on a real session with this agent's providers first.

        Raises:
            NotFoundError, BundleError, VerificationError: the bundle is refused; nothing changes.
        """

        if is_generative_bundle(bundle_path):
            return self.store.install_generative(bundle_path, self._verify_generative, activate=activate)

        def runner(manifest: Manifest, model: bytes) -> Any:
            session = self._session(model, manifest)
            names = [o.name for o in manifest.outputs]
            return lambda feeds: _run(session, names, feeds)

        return self.store.install(bundle_path, golden_verifier(runner), activate=activate)

    def _open_generative(self, manifest: GenManifest, folder: Path, created: float) -> GenerativeModel:
        """Open a generative model folder and run its golden check on that very model."""
        model = open_model(folder, manifest, created, providers=self.settings.providers,
                           intra_op_threads=self.settings.intra_op_threads)
        try:
            check_generative_golden(model, manifest)
        except BaseException:
            model.close()
            raise
        return model

    def _verify_generative(self, manifest: GenManifest, folder: Path, installed_at: float) -> None:
        self._open_generative(manifest, folder, installed_at).close()

    def _same_kind(self, name: str, version: str, kind: str) -> None:
        """Refuse an update that would turn a model of one kind into another under one name."""
        kinds = {m.kind for m in self.store.installed(name)}
        if kinds and kinds != {kind}:
            raise BundleError(f"{name} {version}: the node has {name} as a {'/'.join(sorted(kinds))} "
                              f"model; a bundle of kind {kind} does not update it")

    def install_for_serving(self, bundle_path: Path) -> tuple[InstalledModel, Servable]:
        """Install a verified bundle file without activating it, and return the session the
        golden vectors passed on, ready to serve (blocking; for updates).

        The file work (hashes, unpacking, the model's file-reference check) runs in a worker
        process (:mod:`agent.inference.isolated`), so that it does not hold the interpreter
        that serves requests meanwhile; the session and its golden vectors are made here.
        The version is not served until :meth:`swap`.  When that version was already
        installed from the same bundle, it is loaded (and its golden vectors run) again.

        A generative bundle streams into the store (one read hashes and unpacks it) on this
        thread: its model is opened from the unpacked folder and its golden check runs on the
        very object returned, which then serves.

        Raises:
            NotFoundError, BundleError, VerificationError: the bundle is refused; nothing changes.
        """
        if is_generative_bundle(bundle_path):
            return self._install_generative_for_serving(bundle_path)
        staged, checked = stage_install(self.store, bundle_path)
        if isinstance(staged, InstalledModel):  # already installed: load and check it now
            return staged, self._load_blocking(staged, isolated=True)
        try:
            self._same_kind(staged.manifest.name, staged.manifest.version, "tensor")
        except BundleError:
            self.store.discard(staged.tmp)
            raise
        made: list[LoadedModel] = []

        def verify(manifest: Manifest, model_bytes: bytes, cases: list[GoldenCase]) -> None:
            model = self._checked_model(manifest, model_bytes, cases, None, checked)
            made.append(model)

        try:
            installed = self.store.commit(staged, verify, activate=False)
        except BaseException:
            for model in made:
                model.close()
            raise
        made[0].sha256 = installed.sha256
        return installed, made[0]

    def _install_generative_for_serving(self, bundle_path: Path) -> tuple[InstalledModel, GenerativeModel]:
        manifest = read_gen_manifest(bundle_path)
        self._same_kind(manifest.name, manifest.version, manifest.kind)
        made: list[GenerativeModel] = []

        def verify(manifest: GenManifest, folder: Path, installed_at: float) -> None:
            made.append(self._open_generative(manifest, folder, installed_at))

        try:
            installed = self.store.install_generative(bundle_path, verify, activate=False)
        except BaseException:
            for model in made:
                model.close()
            raise
        if not made:  # that version was installed from this very bundle already: open it again
            return installed, self._load_generative_blocking(installed)
        return installed, made[0]

    def _checked_model(self, manifest: Manifest, model_bytes: bytes, cases: list[GoldenCase],
                       model_dir: Path | None, checked: ModelCheck | None) -> LoadedModel:
        """A session for the model whose golden vectors passed on it, ready to serve.

        Raises:
            BundleError, VerificationError: it does not load, or a golden case fails.
        """
        try:
            session = self._session(model_bytes, manifest, model_dir, checked)
        except BundleError:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several unrelated types
            raise BundleError(f"{manifest.name} {manifest.version}: ONNX Runtime cannot load "
                              f"the model: {exc}") from None
        fixed = checked.fixed_cost if checked is not None else fixed_cost(model_bytes)
        model = self._loaded(manifest, session, "", fixed)
        try:
            _golden_on(model, cases)
        except BaseException:
            model.close()
            raise
        return model

    async def stage(self, name: str, version: str) -> Servable:
        """Load an installed version (of either kind) and run its golden vectors or golden
        check on that very model, without serving it yet (see :meth:`swap`).

        Raises:
            NotFoundError: not installed.
            BundleError, VerificationError: its files no longer match, or its golden vectors
                fail on this node.
        """
        installed = self.store.find(name, version)
        if installed.kind != "tensor":
            return await asyncio.to_thread(self._load_generative_blocking, installed)
        return await asyncio.to_thread(self._load_blocking, installed, isolated=True)

    async def swap(self, model: Servable, *, serve: bool = True, drain_s: float = 30.0) -> None:
        """Make ``model``'s version the active one: the atomic switch of an update or rollback.

        The active-version record is replaced first (durable: the commit point); from then
        on new requests get ``model``.  Every other served version of that name stops being
        handed out at the same instant; requests it already admitted finish on it (up to
        ``drain_s`` seconds) before it is closed.  With ``serve`` False (the name is not
        being served) only the record changes and ``model`` is closed.

        A generative model replaces the served one of its name the same way: new requests
        get ``model`` at once; streams running on the old one finish (up to ``drain_s``
        seconds, then they end with ``finish_reason="cancelled"``), then it is closed,
        which frees its KV budget.

        Raises:
            NotFoundError: that version is not installed.
            OSError: the record cannot be written (nothing changed).
        """
        if not isinstance(model, LoadedModel):
            await self._swap_generative(model, serve=serve, drain_s=drain_s)
            return
        name = model.name
        async with self._lock:
            self.store.activate(name, model.version)
            old = self._served.pop(name, {}) if serve else {}
            if serve:
                self._served[name] = {model.version: model}
                self._failed.pop((name, model.version), None)
        if not serve:
            model.close()
            return
        log.info("serving %s %s on %s (swapped from %s)", name, model.version, model.provider,
                 ", ".join(sorted(old)) or "nothing")
        self._notify(name, True)
        for previous in old.values():
            if previous is model:
                continue
            if not await previous.drain(drain_s):
                log.warning("%s %s: requests still running after %.0f s; closing it anyway",
                            name, previous.version, drain_s)
            previous.close()

    async def _swap_generative(self, model: GenerativeModel, *, serve: bool, drain_s: float) -> None:
        name, version = model.card.name, model.card.version
        old: GenerativeModel | None = None
        async with self._lock:
            self.store.activate(name, version)
            if serve:
                old = self.generative.replace(model)
                self._generative_versions[name] = version
                self._failed.pop((name, version), None)
        if not serve:
            model.close()
            return
        log.info("serving %s %s (%s, swapped from %s)", name, version, model.card.kind,
                 old.card.version if old is not None else "nothing")
        self._notify(name, True)
        if old is None or old is model:
            return
        if not await drain_generative(old, drain_s):
            log.warning("%s %s: streams still running after %.0f s; closing it anyway (they end "
                        "as cancelled)", name, old.card.version, drain_s)
        old.close()

    def _loaded(self, manifest: Manifest, session: Any, sha256: str, fixed: bool) -> LoadedModel:
        return LoadedModel(manifest, session, instances=self.settings.instances,
                           max_queue=self.settings.max_queue,
                           batching=self.settings.dynamic_batching, sha256=sha256, fixed_cost=fixed)

    # ------------------------------------------------------------------ load / unload

    def _load_blocking(self, installed: InstalledModel, *, isolated: bool = False) -> LoadedModel:
        """Load an installed version and run its golden vectors on the session.  ``isolated``:
        re-check its files in a worker process first (:mod:`agent.inference.isolated`), for a
        load while requests are being served."""
        checked = check_installed(self.store, installed) if isolated else None
        opened = self.store.open(installed)
        model = self._checked_model(opened.manifest, opened.model, opened.golden, installed.path, checked)
        model.sha256 = installed.sha256
        return model

    async def load(self, name: str, version: str | None = None, *, isolated: bool = True) -> LoadedModel:
        """Serve an installed version of ``name`` (default: the active one); return it.
        ``isolated``: its files are re-checked in a worker process, so that a load while
        requests are served does not hold their interpreter (False at start-up, where
        starting a worker per model would only cost time).

        Raises:
            NotFoundError: not installed.
            BundleError, VerificationError: its files no longer match, or its golden
                vectors fail on this node; it is not served.
        """
        async with self._lock:
            installed = self.store.find(name, self._installed_version(name, version))
            if installed.kind != "tensor":
                raise NotFoundError(f"model {echo(name)} is a generative ({installed.kind}) bundle: "
                                    "served by serve(), not as a tensor model")
            current = self._served.get(name, {}).get(installed.version)
            if current is not None:
                return current
            try:
                model = await asyncio.to_thread(self._load_blocking, installed, isolated=isolated)
            except ApplianceError as exc:
                self._failed[(name, installed.version)] = str(exc)
                log.error("not serving %s %s: %s", name, installed.version, exc)  # noqa: TRY400
                raise
            self._failed.pop((name, installed.version), None)
            self._served.setdefault(name, {})[installed.version] = model
            log.info("serving %s %s on %s", name, installed.version, model.provider)
        self._notify(name, True)
        return model

    async def serve(self, name: str, version: str | None = None, *, isolated: bool = True) -> None:
        """Serve an installed version of ``name`` (default: the active one), whatever its
        kind: a tensor model as :meth:`load` does, a generative one through
        :attr:`generative` after its files re-check and its golden check passes.

        Raises:
            NotFoundError: not installed.
            BundleError, VerificationError: its files no longer match, or its golden check
                fails on this node; it is not served.
        """
        installed = self.store.find(name, self._installed_version(name, version))
        if installed.kind == "tensor":
            await self.load(name, version, isolated=isolated)
            return
        async with self._lock:
            if self._generative_versions.get(name) == installed.version:
                return
            loop = asyncio.get_running_loop()
            try:
                model = await loop.run_in_executor(None, self._load_generative_blocking, installed)
            except ApplianceError as exc:
                self._failed[(name, installed.version)] = str(exc)
                log.error("not serving %s %s: %s", name, installed.version, exc)  # noqa: TRY400
                raise
            self._failed.pop((name, installed.version), None)
            self.generative.add(model)
            self._generative_versions[name] = installed.version
            log.info("serving %s %s (%s)", name, installed.version, installed.kind)
        self._notify(name, True)

    def _load_generative_blocking(self, installed: InstalledModel) -> GenerativeModel:
        manifest, folder = self.store.open_generative(installed)
        return self._open_generative(manifest, folder, installed.installed_at)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``; running requests finish.

        Raises:
            NotFoundError: ``name`` is not being served.
        """
        async with self._lock:
            if self._generative_versions.pop(name, None) is not None:
                self.generative.remove(name)
                versions: dict[str, LoadedModel] | None = {}
            else:
                versions = self._served.pop(name, None)
            if versions is None:
                raise NotFoundError(f"model {echo(name)} is not loaded")
            for model in versions.values():
                model.close()
        log.info("unloaded %s", name)
        self._notify(name, False)

    async def close(self) -> None:
        """Unload everything (agent shutdown)."""
        for name in [*self._served, *self._generative_versions]:
            await self.unload(name)

    # ------------------------------------------------------------------ lookups

    def triton_version(self, name: str, version: str) -> str:
        """The Triton version number of ``name``'s bundle ``version``, as a string."""
        known = lambda: [m.version for m in self.store.installed(name)]  # noqa: E731
        return str(self.numbers.number(name, version, known))

    def _by_number(self, name: str, number: str) -> str | None:
        """The bundle version whose Triton number is ``number``; the installed versions are
        numbered first, so a number works before anything else asked for one."""
        if not is_number(number):
            return None
        self.numbers.number_all(name, [m.version for m in self.store.installed(name)])
        return self.numbers.version_of(name, number)

    def _installed_version(self, name: str, version: str | None) -> str | None:
        """``version`` as a bundle version: a Triton number that names no installed bundle
        version is translated."""
        if not version or any(m.version == version for m in self.store.installed(name)):
            return version
        return self._by_number(name, version) or version

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The served model for a request; without a version, the active one (else the newest).
        ``version`` is a bundle version or its Triton number (the bundle version wins).

        Raises:
            NotFoundError: the model or that version is not being served.
        """
        versions = self._served.get(name)
        if not versions:
            raise NotFoundError(f"unknown model {echo(name)}: not being served "
                                f"(served: {', '.join(sorted(self._served)) or 'none'})")
        if version:
            model = versions.get(version)
            if model is None:
                model = versions.get(self._by_number(name, version) or "")
            if model is None:
                served = ", ".join(f"{v} (Triton version {self.triton_version(name, v)})"
                                   for v in sorted(versions))
                raise NotFoundError(f"model {echo(name)} has no served version {echo(version)} "
                                    f"(served: {served})")
            return model
        if len(versions) == 1:  # the active one, or else the newest: the only one either way
            return next(iter(versions.values()))
        active = self.store.active_version(name)
        if active in versions:
            return versions[active]
        return max(versions.values(), key=lambda m: m.manifest.version_tuple)

    def versions(self, name: str) -> list[str]:
        """Served versions of ``name``, oldest first."""
        models = self._served.get(name, {})
        return [m.version for m in sorted(models.values(), key=lambda m: m.manifest.version_tuple)]

    def served(self) -> list[LoadedModel]:
        return [m for versions in self._served.values() for m in versions.values()]

    def serving(self) -> list[tuple[str, str]]:
        """(name, version) of every served model, tensor and generative, sorted."""
        tensor = [(m.name, m.version) for m in self.served()]
        return sorted(tensor + list(self._generative_versions.items()))

    def serving_versions(self, name: str) -> list[str]:
        """Served versions of ``name`` of either kind, oldest first."""
        generative = self._generative_versions.get(name)
        return [generative] if generative is not None else self.versions(name)

    def is_served(self, name: str) -> bool:
        """Whether any version of ``name`` is being served."""
        return bool(self._served.get(name)) or name in self._generative_versions

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except NotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ read API

    def installed(self) -> list[dict[str, Any]]:
        """Installed, verified versions with whether each is served and on which provider."""
        served = {(m.name, m.version): m for m in self.served()}
        out = []
        for inst in self.store.installed():
            model = served.get((inst.name, inst.version))
            generative = self._generative_versions.get(inst.name) == inst.version
            out.append(self.store.describe(inst) | {"loaded": model is not None or generative,
                                         "provider": model.provider if model else ""})
        return out

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Statistics snapshots of served models (all, or one name/version).

        Raises:
            NotFoundError: ``name`` (or that version) is not being served.
        """
        if name:
            models = [self.get(name, version)] if version else list(self._served.get(name, {}).values())
            if not models:
                raise NotFoundError(f"unknown model {echo(name)}: not being served")
        else:
            models = self.served()
        return [m.stats.snapshot() | {"triton_version": self.triton_version(m.name, m.version)}
                for m in sorted(models, key=lambda m: (m.name, m.manifest.version_tuple))]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every installed version with its state (READY when served)."""
        served = {(m.name, m.version) for m in self.served()} | set(self._generative_versions.items())
        out = []
        for inst in self.store.installed():
            key = (inst.name, inst.version)
            if key in served:
                out.append(IndexEntry(inst.name, inst.version, "READY", ""))
            elif not ready_only:
                out.append(IndexEntry(inst.name, inst.version, "UNAVAILABLE",
                                      self._failed.get(key, "not loaded")))
        return out


def _run(session: Any, names: list[str], feeds: Any) -> dict[str, Any]:
    from agent.inference.model import feeds_for_session, to_bytes_array

    results = session.run(names, feeds_for_session(dict(feeds)))
    return {n: to_bytes_array(r) for n, r in zip(names, results, strict=True)}


def _golden_on(model: LoadedModel, cases: list[GoldenCase]) -> None:
    names = list(model.outputs)
    check_golden(model.manifest, cases, lambda feeds: model.run_sync(dict(feeds), names))
