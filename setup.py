"""Build hook: compile the agent's .proto files into the wheel (generated, never hand-edited)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        if getattr(self, "editable_mode", False):
            # An editable install imports the sources in place; agent.proto builds its modules
            # on first import with the environment's own grpcio-tools, matching its protobuf.
            super().run()
            return
        spec = importlib.util.spec_from_file_location(
            "_proto_build", Path(__file__).parent / "agent" / "proto" / "__init__.py"
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        super().run()
        module.generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithProtos})
