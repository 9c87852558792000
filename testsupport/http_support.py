"""A site PKI for the HTTPS port's tests, and the port served in-process on its own thread
(so that synchronous clients such as ``openai.OpenAI`` can call it from the test's thread)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from agent import security
from agent.config import load_config
from agent.context import AgentContext
from agent.llm.types import GenerativeModels
from agent.web.app import Surface, start_http
from agent.web.serve import bound_port, build_app
from provisioning.pki import init_pki, issue_client, issue_node, revoke
from testsupport.secure_server import roleless_client

T = TypeVar("T")


def site_pki(d: Path, other: Path) -> Path:
    """A site CA in ``d`` with a node certificate for localhost and clients: one per role,
    ``gone`` (revoked), ``old`` (expired), ``norole-None`` (no OU) and ``intruder`` (from the
    CA in ``other``)."""
    init_pki(d, organization="Test Site")
    issue_node(d, "node1", dns=["localhost"], ips=["127.0.0.1"])
    for role in ("observer", "operator", "admin"):
        issue_client(d, role, role)
    issue_client(d, "gone", "admin")
    revoke(d, "gone", reason="key-compromise")
    issue_client(d, "old", "admin", days=1, valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    roleless_client(d, None)
    init_pki(other, organization="Someone Else")
    issue_client(other, "intruder", "admin", out=d / "issued" / "intruder")
    return d


def tls_config(workdir: Path, pki: Path, extra: str = "") -> Path:
    node = pki / "issued" / "node1"
    config = workdir / "agent.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1"\n{extra}\n'
                      f'[tls]\ncert = "{node / "node1.crt"}"\nkey = "{node / "node1.key"}"\n'
                      f'ca = "{pki / "ca.crt"}"\ncrl = "{pki / "crl.pem"}"\n')
    return config


class LoopThread:
    """An asyncio loop running in its own thread, for servers that synchronous clients call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class HttpsPort(LoopThread):
    """The agent's HTTPS application over ``models`` on 127.0.0.1, on a loop in its own thread."""

    def __init__(self, config_path: Path, models: GenerativeModels | None) -> None:
        super().__init__()
        config = load_config(config_path)
        ctx = AgentContext(config=config)
        ctx.generative = models
        tls = security.client_tls(config)
        self.runner: web.AppRunner = self.call(
            start_http(build_app(ctx, Surface(tls, None, config.limits, config.server.max_message_bytes)),
                       "127.0.0.1", 0, tls, 5.0))
        self.port = bound_port(self.runner)

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.stop()
