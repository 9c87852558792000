"""pyinfra deploy run by the configure stage: ``pyinfra @chroot/ROOT configure.py --data plan=FILE``.

It applies a :class:`provisioning.image.plan.Plan` (computed and tested apart from this file):
removals, commands in the chroot, files, the commands that read them, then unit enablement.
It is data-driven on purpose, so what an image gets is readable in plan.py and testable
without a chroot.
"""

import io
import json
import shlex
from pathlib import Path

from pyinfra import host  # type: ignore[attr-defined]
from pyinfra.operations import files, server

plan = json.loads(Path(host.data.plan).read_text())
env = {"SOURCE_DATE_EPOCH": str(host.data.source_date_epoch), "LC_ALL": "C.UTF-8"}

for path in plan["remove"]:
    server.shell(name=f"remove {path}", commands=[f"rm -rf -- {json.dumps(path)}"])

# shlex, not JSON, quoting: inside JSON's double quotes the shell still expands $ and `,
# so an argument such as sed's "$a LINE" would change on its way to the program.
for argv in plan["commands"]:
    server.shell(name=" ".join(argv)[:100], commands=[shlex.join(argv)], _env=env)

for spec in plan["files"]:
    files.put(name=f"write {spec['path']}", src=io.BytesIO(spec["content"].encode()),
              dest=spec["path"], mode=f"{spec['mode']:o}", user=spec["owner"],
              group=spec["group"], create_remote_dir=True)

for argv in plan["after_files"]:  # what reads the files just written (plan.py Plan.after_files)
    server.shell(name=" ".join(argv)[:100], commands=[shlex.join(argv)], _env=env)

for unit in plan["enable"]:
    server.shell(name=f"enable {unit}", commands=[f"systemctl enable {unit}"], _env=env)

for unit in plan["mask"]:
    server.shell(name=f"mask {unit}", commands=[f"systemctl mask {unit}"], _env=env)

# Last: pyinfra 3.10 exits 0 even when an operation failed (it then skips the rest), so the
# caller learns that every operation ran from this marker, which it removes again.
server.shell(name="configure complete", commands=["touch /.appliance-configure-done"])
