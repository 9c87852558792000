#!/usr/bin/env python3
"""Server CPU per inference request, throughput, p50 and p99: a real agent over gRPC with
mTLS (site CA, client certificate, CRL), driven by perf_analyzer.  Prints figures; asserts
nothing.

    PYTHONPATH=. python bench/request_cpu.py [--seconds S] [--rounds N] [--json]
    PYTHONPATH=. python bench/request_cpu.py --py-spy prof.txt   # profile tiny at concurrency 16

Per model (tiny: a few us of compute; mlp: ~0.4 ms) and concurrency (1, 16):
- server CPU per request: CPU seconds of the agent's process (utime + stime of all its
  threads, /proc/PID/stat) over the run / requests it answered (its own statistics).  On a
  shared machine this is the steadiest figure: it does not depend on what else runs;
- throughput, p50 and p99 as perf_analyzer (a C++ client, so the client takes little of
  the CPU the agent needs) measures them;
- added p50 at concurrency 1 over ONNX Runtime called in-process on the same model, from
  perf_analyzer's p50 and from tritonclient (Python) timed in blocks alternating with the
  in-process calls.

``--rounds N`` repeats every phase N times in turn and prints the median of each figure.
``--py-spy FILE`` (py-spy installed in the venv; not a project dependency) samples the agent
while it serves tiny at concurrency 16 and writes the top of the profile to FILE.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.ort import make_session  # noqa: E402
from provisioning.demo.models import affine_model, matmul_chain_model  # noqa: E402
from provisioning.pki import init_pki, issue_client, issue_node  # noqa: E402
from testsupport.inference_support import Agent, install, make_bundle  # noqa: E402

CLIENT = "bench"
MLP_W, MLP_DEPTH = 1024, 4
CONCURRENCY = (1, 16)
SHAPES = {"tiny": "1,4", "mlp": f"1,{MLP_W}"}


class Pki:
    """A site CA, a node certificate for 127.0.0.1 and one observer client certificate."""

    def __init__(self, root: Path) -> None:
        self.root = root
        init_pki(root, organization="Bench Site")
        issue_node(root, "node", dns=["localhost"], ips=["127.0.0.1"])
        issue_client(root, CLIENT, "observer")
        self.ca = root / "ca.crt"
        self.key = root / "issued" / CLIENT / f"{CLIENT}.key"
        self.cert = root / "issued" / CLIENT / f"{CLIENT}.crt"

    def agent_toml(self, out: Path) -> Path:
        node = self.root / "issued" / "node"
        out.write_text(f'[server]\nlisten = "127.0.0.1"\nport = 0\nmetrics_port = 0\n'
                       f'[tls]\ncert = "{node / "node.crt"}"\nkey = "{node / "node.key"}"\n'
                       f'ca = "{self.ca}"\ncrl = "{self.root / "crl.pem"}"\n')
        return out

    def client(self, url: str) -> Any:
        import tritonclient.grpc as tc

        return tc.InferenceServerClient(url, ssl=True, root_certificates=str(self.ca),
                                        private_key=str(self.key), certificate_chain=str(self.cert))

    def perf_analyzer_args(self) -> list[str]:
        return ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(self.ca),
                "--ssl-grpc-private-key-file", str(self.key),
                "--ssl-grpc-certificate-chain-file", str(self.cert)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answered(client: Any, model: str) -> tuple[int, int]:
    """(successful, failed) requests of ``model`` so far, from the agent's statistics."""
    stats = client.get_inference_statistics(model).model_stats[0].inference_stats
    return int(stats.success.count), int(stats.fail.count)


def perf_analyzer_bin() -> str:
    pa = ROOT / ".tools" / "perf_analyzer"
    if not pa.exists():
        subprocess.run([str(ROOT / "bench" / "tools" / "get-perf-analyzer")], check=True,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True)
    return str(pa)


def load(pki: Pki, agent: Agent, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    """perf_analyzer against ``model``; CPU and answered requests taken around the whole run."""
    client = pki.client(agent.url)
    try:
        ok0, fail0 = answered(client, model)
        cpu0 = cpu_seconds(agent.proc.pid)
        with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
            argv = [perf_analyzer_bin(), "-i", "grpc", "-u", agent.url, "-m", model,
                    "--concurrency-range", f"{concurrency}:{concurrency}",
                    "--measurement-interval", str(int(seconds * 1000)), "--percentile", "50",
                    "--max-trials", "3", "--stability-percentage", "999", "-f", csv.name,
                    "--shape", f"x:{SHAPES[model]}",
                    *pki.perf_analyzer_args()]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            cpu1 = cpu_seconds(agent.proc.pid)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
            header, row = Path(csv.name).read_text().splitlines()[:2]
        ok1, fail1 = answered(client, model)
    finally:
        client.close()
    data = dict(zip(header.split(","), row.split(","), strict=True))
    requests = ok1 - ok0
    return {"throughput_per_s": float(data["Inferences/Second"]),
            "p50_us": float(data["p50 latency"]), "p99_us": float(data["p99 latency"]),
            "cpu_us_per_request": (cpu1 - cpu0) / max(1, requests) * 1e6,
            "requests": requests, "failed": fail1 - fail0}


def timed(fn: Any, n: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def added_p50(pki: Pki, agent: Agent, model_file: Path, name: str, x: np.ndarray,
              n: int = 1200, blocks: int = 6) -> dict[str, float]:
    """In-process ORT and tritonclient over mTLS, timed in alternating blocks."""
    import tritonclient.grpc as tc

    session = make_session(model_file.read_bytes())
    client = pki.client(agent.url)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    ref: list[float] = []
    got: list[float] = []
    try:
        for _ in range(blocks):
            ref += timed(lambda: session.run(None, {"x": x}), n // blocks)
            got += timed(lambda: client.infer(name, [inp]), n // blocks)
    finally:
        client.close()
    return {"inprocess_p50_us": float(np.median(ref) * 1e6),
            "tritonclient_p50_us": float(np.median(got) * 1e6)}


def top_of_profile(raw: Path, limit: int = 25) -> str:
    """py-spy's raw (collapsed) stacks as two tables: self samples and inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "-- self --"]
    lines += [f"{100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(limit)]
    lines.append("-- inclusive --")
    lines += [f"{100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(limit)]
    return "\n".join(lines)


def profile(pki: Pki, agent: Agent, out: Path, seconds: float) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy needs py-spy (pip install py-spy into the venv)")
    raw = out.with_suffix(".raw")
    rec = subprocess.Popen([spy, "record", "--pid", str(agent.proc.pid), "--format", "raw",
                            "--rate", "250", "-o", str(raw), "--nonblocking", "--gil"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        load(pki, agent, "tiny", 16, seconds)
    finally:
        rec.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        rec.wait(30)
    out.write_text(top_of_profile(raw) + "\n")


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every phase, print medians")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                        help="profile tiny at concurrency 16 instead; write the top to FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pki = Pki(tmp / "pki")
        tiny_m = affine_model(tmp / "tiny.onnx")
        mlp_m = matmul_chain_model(tmp / "mlp.onnx", width=MLP_W, depth=MLP_DEPTH)
        x_tiny = np.ones((1, 4), np.float32)
        x_mlp = np.ones((1, MLP_W), np.float32)
        state = tmp / "state"
        install(state, make_bundle(tmp, tiny_m, "tiny", "1", {"x": x_tiny}),
                make_bundle(tmp, mlp_m, "mlp", "1", {"x": x_mlp}))
        agent = Agent(state, "--config", str(pki.agent_toml(tmp / "agent.toml")))
        try:
            if args.py_spy is not None:
                profile(pki, agent, args.py_spy, args.seconds)
                print(args.py_spy.read_text())
                return 0
            runs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
            for _ in range(args.rounds):
                for model in ("tiny", "mlp"):
                    for conc in CONCURRENCY:
                        runs[f"{model} c{conc}"].append(load(pki, agent, model, conc, args.seconds))
                for model, path, x in (("tiny", tiny_m, x_tiny), ("mlp", mlp_m, x_mlp)):
                    runs[f"{model} added"].append(added_p50(pki, agent, path, model, x))
        finally:
            agent.stop()
    results = {k: median_of(v) for k, v in runs.items()}
    for model in ("tiny", "mlp"):
        added = results[f"{model} added"]
        added["added_p50_us_tritonclient"] = added["tritonclient_p50_us"] - added["inprocess_p50_us"]
        added["added_p50_us_perf_analyzer"] = results[f"{model} c1"]["p50_us"] - added["inprocess_p50_us"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"agent over mTLS, perf_analyzer, {args.seconds:g} s windows, median of {args.rounds} round(s)")
    heads = ("CPU us/req", "req/s", "p50 us", "p99 us", "failed")
    print(f"{'model':6} {'conc':>4} " + " ".join(f"{h:>{max(8, len(h))}}" for h in heads))
    for model in ("tiny", "mlp"):
        for conc in CONCURRENCY:
            r = results[f"{model} c{conc}"]
            print(f"{model:6} {conc:>4} {r['cpu_us_per_request']:>10.0f} {r['throughput_per_s']:>8.0f} "
                  f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['failed']:>8.0f}")
    for model in ("tiny", "mlp"):
        a = results[f"{model} added"]
        print(f"{model}: in-process p50 {a['inprocess_p50_us']:.0f} us; added p50 at concurrency 1: "
              f"{a['added_p50_us_perf_analyzer']:.0f} us (perf_analyzer), "
              f"{a['added_p50_us_tritonclient']:.0f} us (tritonclient)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
