"""provisioning/ansible playbooks, run with ansible-playbook against agents on loopback."""

from __future__ import annotations

import getpass
import json
import os
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.image.measure import pcr11_record
from provisioning.pki import init_pki, issue_client, issue_node
from testsupport.pe import pe_image
from testsupport.secure_server import mtls_config, spawn

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "provisioning" / "ansible"


def playbook(tmp_path: Path, name: str, inventory: Path,
              extra: dict[str, object]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / ".ansible-tmp"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOST_KEY_CHECKING="0", ANSIBLE_RETRY_FILES_ENABLED="0")
    extra = {"appliance_cli": [sys.executable, "-m", "provisioning.cli"],
             "ansible_python_interpreter": sys.executable, **extra}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                           str(PLAYBOOKS / name), "-e", json.dumps(extra)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def enroll_setup(tmp_path: Path, host: str, agent_toml: str, *,
                 attest: bool) -> tuple[Path, Path, Path, Path, dict[str, object]]:
    """A site PKI, a node's TLS directory and agent.toml (``agent_toml``), an inventory naming
    ``host`` on this machine, and enroll.yml's variables (``appliance_attest`` = ``attest``).
    Returns the PKI, TLS directory, agent.toml, inventory and variables."""
    pki = tmp_path / "pki"
    init_pki(pki, organization="Ansible Site")
    tls = tmp_path / "node-tls"
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[appliances]\n"
                         f"{host} ansible_connection=local ansible_host=127.0.0.1 "
                         f"appliance_tls_dir={tls} appliance_config={config}\n")
    extra = {"pki_dir": str(pki), "appliance_restart": False, "appliance_key_owner": getpass.getuser(),
             "appliance_attest": attest}
    return pki, tls, config, inventory, extra


def test_enroll_then_query_the_enrolled_agent(tmp_path: Path) -> None:
    """The key is made on the node and never leaves it; the CA signs the node's request; the
    agent's config is switched to 0.0.0.0 with mTLS, and an agent started from it answers."""
    # appliance_attest off: the host's TPM, if it has one, is not the test's (tests/test_attest_node.py
    # enrols a software TPM)
    pki, tls, config, inventory, extra = enroll_setup(
        tmp_path, "localhost", '[server]\nlisten = "127.0.0.1"\nport = 0\nmetrics_port = 0\n\n[tls]\n'
        'loopback_role = "admin"\n', attest=False)
    issue_client(pki, "observer", "observer")
    first = playbook(tmp_path, "enroll.yml", inventory, extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert stat.S_IMODE((tls / "node.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tls / "node.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # The certificate is for the key made on the node; no private key of it is on the control side.
    key = serialization.load_pem_private_key((tls / "node.key").read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    assert not (pki / "issued" / "localhost" / "localhost.key").exists()
    assert sorted(p.name for p in (pki / "requests").iterdir()) == ["localhost.csr"]
    assert not (tls / "ak.pub").exists() and "attest" not in tomllib.loads(config.read_text())
    settings = tomllib.loads(config.read_text())
    assert settings["server"] == {"listen": "0.0.0.0", "port": 0, "metrics_port": 0}
    assert settings["tls"] == {"loopback_role": "admin", "cert": f"{tls}/node.crt", "key": f"{tls}/node.key",
                               "ca": f"{tls}/ca.crt", "crl": f"{tls}/crl.pem"}
    again = playbook(tmp_path, "enroll.yml", inventory, extra)  # idempotent: nothing re-issued
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-2000:]
    assert x509.load_pem_x509_certificate((tls / "node.crt").read_bytes()) == cert

    # The agent serves from the edited config; the fleet CLI reaches it over mTLS.
    with spawn(config) as (ports, _pid):
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nname = "localhost"\naddress = "127.0.0.1"\nport = {ports[0]}\n')
        d = pki / "issued" / "observer"
        proc = subprocess.run([sys.executable, "-m", "provisioning.cli", "fleet", "status", "-i", str(nodes),
                               "--json", "--ca", str(pki / "ca.crt"), "--cert", str(d / "observer.crt"),
                               "--key", str(d / "observer.key")], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["ok"] == 1


def test_rollout_in_serial_batches_halts_after_a_failed_batch(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, organization="Rollout Site")
    issue_node(pki, "node", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(pki, "operator", "operator")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with spawn(mtls_config(tmp_path, pki), ports=5) as (ports, _pid):
            hosts = [f"n{i} appliance_port={p}" for i, p in enumerate(ports)]
            hosts.insert(2, f"dead appliance_port={silent.getsockname()[1]}")  # in the second batch
            inventory = tmp_path / "hosts.ini"
            inventory.write_text("[appliances]\n" + "\n".join(
                f"{h} ansible_host=127.0.0.1 appliance_tls_name=localhost ansible_connection=local"
                for h in hosts) + "\n")
            d = pki / "issued" / "operator"
            creds = {"fleet_ca": str(pki / "ca.crt"), "fleet_cert": str(d / "operator.crt"),
                     "fleet_key": str(d / "operator.key")}
            result = playbook(tmp_path, "rollout.yml", inventory, {
                "targets": ["model@2"], "rollout_serial": [1, 2], "rollout_deadline": 2, **creds})
            # With attest_expect each node must then pass `fleet attest`; these test agents answer
            # Node/Attest with an empty reply, so the canary never attests and the rollout stops.
            manifest = tmp_path / "image-manifest.json"
            uki = pe_image([(".linux", b"kernel")])
            manifest.write_text(json.dumps({"roothash": "ab" * 32, "pcr11": pcr11_record(uki)}))
            gated = playbook(tmp_path, "rollout.yml", inventory, {
                "targets": ["model@2"], "rollout_serial": [1, 2], "rollout_deadline": 2, **creds,
                "attest_expect": [str(manifest)], "fleet_site_ca": str(pki / "ca.crt"),
                "attest_retries": 1, "attest_delay": 0})
    finally:
        silent.close()
    gated_out = gated.stdout
    assert gated.returncode != 0, gated_out[-3000:]
    assert "Wait until the node attests" in gated_out and "FAILED - RETRYING" in gated_out, gated_out[-3000:]
    assert "not attested: TPM2B_PUBLIC" in gated_out, gated_out[-3000:]  # it asked and judged the answer
    gated_recap = gated_out[gated_out.index("PLAY RECAP"):]
    assert "n0" in gated_recap and "n1" not in gated_recap, gated_recap
    out = result.stdout
    assert result.returncode != 0, out[-3000:]
    recap = out[out.index("PLAY RECAP"):]
    # Batches: [n0], [n1, dead], then halted: n2, n3, n4 never run.
    assert "n0" in recap and "n1" in recap and "dead" in recap, recap
    assert all(f"n{i} " not in recap for i in (2, 3, 4)), recap
    assert "no answer within 2 s" in out
    assert '"outcome": "applied"' in out or "'outcome': 'applied'" in out
