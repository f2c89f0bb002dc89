"""The Gramine build as a user drives it: the Makefile, and tee_runner.py started with the fixed
command line and environment of the manifest it renders (no Gramine installation needed).

Template-level checks and the shared helpers are in test_gramine.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

from test_gramine import (APPS, GRAMINE_DIR, GRAMINE_HELPER_THREADS, ROOT, _arch_libdir, _entrypoint,
                          _env_kwargs, covered_by_trusted, render, template, thread_budget)
from test_gramine import defines, model_dir  # noqa: F401  (fixtures)


# --------------------------------------------------------------------------- the runner, as the enclave starts it


def enclave_environment(manifest: dict, **host: str) -> dict[str, str]:
    """The environment Gramine gives the enclave: the manifest's fixed values, plus the host's for
    passed-through names. LD_LIBRARY_PATH is left out: its /lib is Gramine's glibc, only in there."""
    env = {name: value if isinstance(value, str) else value["value"]
           for name, value in manifest["loader"]["env"].items() if value != {"passthrough": True}}
    env.pop("LD_LIBRARY_PATH")
    for name in host:
        assert manifest["loader"]["env"][name] == {"passthrough": True}, name
    return {**env, **host}


def run_as_enclave(manifest: dict, timeout: float = 120, **host: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the manifest's fixed command line natively; returns the result and the most threads the
    process had at once (sampled from /proc: a lower bound of its true peak)."""
    argv = manifest["loader"]["argv"]
    process = subprocess.Popen(argv, cwd=manifest["fs"]["start_dir"], env=enclave_environment(manifest, **host),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, deadline = 0, time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, len(os.listdir(f"/proc/{process.pid}/task")))
        except FileNotFoundError:
            break
        time.sleep(0.002)
    out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    return subprocess.CompletedProcess(argv, process.returncode, out, err), peak


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_runner_in_the_enclave_environment_stays_within_the_thread_budget(defines, tiny_dir):
    """A guarded prefill, over the socket and over shared memory with a tcp loopback header channel,
    started as the manifest starts it: the threads it runs never exceed max_threads less Gramine's
    own helpers, with max_threads at the bare budget."""
    from tsqp import api

    server = api.start_server(tiny_dir, device="cpu", shm=True)
    budget = thread_budget(1, 1, 1)
    try:
        for shm in ("0", "1"):
            settings = {"model_dir": str(tiny_dir), "protection": "private", "verify": "1", "shm": shm,
                        "omp_threads": "1", "blas_threads": "1", "interop_threads": "1", "max_threads": str(budget)}
            m = render.render_manifest(template("tee_runner"), {**defines, **settings}, **_env_kwargs())
            result, peak = run_as_enclave(m, LLAMA_GPU_ENDPOINT=server.endpoint, PREFILL_TOKEN_LENGTH="96")
            assert result.returncode == 0, result.stderr
            assert "Logits shape: torch.Size([1, 1, 512])" in result.stdout
            assert ("shared memory" in result.stdout) == (shm == "1")
            assert 1 <= peak <= m["sgx"]["max_threads"] - GRAMINE_HELPER_THREADS, (shm, peak)
    finally:
        server.stop()


def test_runner_sizes_torch_pools_from_the_manifest(defines):
    """torch reads no variable for its inter-op pool: tee_runner.py sizes it from the manifest's."""
    rng = random.Random(5)
    interop = rng.choice([n for n in range(3, 10) if n != os.cpu_count()])  # never torch's own default
    m = render.render_manifest(template("tee_runner"),
                               {**defines, "omp_threads": "1", "interop_threads": str(interop)}, **_env_kwargs())
    code = ("import torch, tee_runner; tee_runner.prepare([]); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    r = subprocess.run([m["libos"]["entrypoint"], "-c", code], cwd=m["fs"]["start_dir"],
                       env=enclave_environment(m, LLAMA_GPU_ENDPOINT="tcp://127.0.0.1:50051"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", str(interop)]


def test_runner_in_the_enclave_refuses_endpoints_that_cannot_leave_it(defines, tiny_dir):
    """A passed-through endpoint is only known at run time: the runner refuses there, in one line,
    what the build refuses for a pinned one."""
    rng = random.Random(13)
    port = rng.randint(1024, 65535)
    remote = f"tcp://10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}:{port}"
    cases = (("0", f"ipc:///tmp/tsqp-{port}.sock", "ipc:// does not cross the enclave boundary"),
             ("1", f"ipc:///tmp/tsqp-{port}.sock", "ipc:// does not cross the enclave boundary"),
             ("1", remote, "must be tcp loopback"),
             ("1", f"gpu-host:{port}", "must be tcp loopback"))
    for shm, endpoint, message in cases:
        m = render.render_manifest(template("tee_runner"), {**defines, "model_dir": str(tiny_dir), "shm": shm},
                                   **_env_kwargs())
        result, _ = run_as_enclave(m, LLAMA_GPU_ENDPOINT=endpoint, PREFILL_TOKEN_LENGTH="8")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and endpoint in lines[0] and message in lines[0], lines[0]


# --------------------------------------------------------------------------- Makefile


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_check(tmp_path, model_dir):
    r = subprocess.run(
        ["make", "-C", str(GRAMINE_DIR), "check", f"PYTHON={sys.executable}",
         f"CHECK_DIR={tmp_path}", f"LLAMA_MODEL_PATH={model_dir}"],
        capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for app in APPS:
        m = tomllib.loads((tmp_path / f"{app}.manifest.check").read_text())
        assert os.path.isabs(m["libos"]["entrypoint"])
        assert m["loader"]["argv"][1] == f"{ROOT}/{app}.py"
        assert covered_by_trusted(model_dir / "config.json", m)
        assert m["loader"]["env"]["LLAMA_MODEL_PATH"] == str(model_dir)
    # `make check` must not leave files in the source tree when CHECK_DIR is elsewhere.
    assert not list(GRAMINE_DIR.glob("*.manifest.check"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_without_gramine_fails_friendly(tmp_path, model_dir):
    r = subprocess.run(
        ["make", "-C", str(GRAMINE_DIR), "tee_runner", f"PYTHON={sys.executable}",
         f"LLAMA_MODEL_PATH={model_dir}", "GRAMINE_MANIFEST=tsqp-no-such-gramine-manifest"],
        capture_output=True, text=True)
    assert r.returncode != 0
    assert "not found" in r.stderr and "make check" in r.stderr
    assert not (GRAMINE_DIR / "tee_runner.manifest").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_passes_expected_defines(model_dir):
    """Dry run with a fake gramine-manifest: check the command line the Makefile builds."""
    r = subprocess.run(
        ["make", "-n", "-C", str(GRAMINE_DIR), "all", "SGX=1", f"PYTHON={sys.executable}",
         f"LLAMA_MODEL_PATH={model_dir}", "GRAMINE_MANIFEST=true"],
        capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for app in APPS:
        assert f"{app}.manifest.template {app}.manifest.tmp" in out
        assert f"--manifest {app}.manifest --output {app}.manifest.sgx" in out
    assert "server.manifest" not in out  # nothing is rendered or signed for the server
    assert f"-Dentrypoint={_entrypoint()}" in out
    assert f"-Dmodel_dir={model_dir}" in out
    assert f"-Dapp_dir={ROOT}" in out
    assert f"-Darch_libdir={_arch_libdir()}" in out


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_passes_the_guarded_modes_and_refuses_bad_ones(model_dir):
    def dry_run(*settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "-C", str(GRAMINE_DIR), "tee_runner", f"PYTHON={sys.executable}",
                               f"LLAMA_MODEL_PATH={model_dir}", "GRAMINE_MANIFEST=true", *settings],
                              capture_output=True, text=True)

    assert "-Dprotection=none -Dverify=0 -Dshm=0" in dry_run().stdout
    assert "-Dprotection=private -Dverify=1 -Dshm=1" in dry_run("PROTECTION=private", "VERIFY=1", "SHM=1").stdout
    for bad, message in (("PROTECTION=secret", "PROTECTION must be one of: none private"),
                         ("VERIFY=yes", "VERIFY must be one of: 0 1"), ("SHM=", "SHM must be one of: 0 1"),
                         ("VERIFY=1 1", "VERIFY must be one of: 0 1")):
        r = dry_run(bad)
        assert r.returncode != 0 and message in r.stderr


def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(GRAMINE_DIR), *args, f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, env=env)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_server_refuses_and_says_why():
    """The server cannot run under Gramine (libzmq's bind needs netlink): nothing is offered for it."""
    r = make("server")
    assert r.returncode != 0
    assert "natively" in r.stderr and "netlink" in r.stderr
    assert not list(GRAMINE_DIR.glob("server.manifest*"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_pins_endpoints_and_warns_about_passed_through_ones(tmp_path, model_dir):
    rng = random.Random(17)
    port = rng.randint(1024, 65535)
    base = ["check", f"CHECK_DIR={tmp_path}", f"LLAMA_MODEL_PATH={model_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_GPU_ENDPOINT"}

    def endpoint_in_manifest():
        return tomllib.loads((tmp_path / "tee_runner.manifest.check").read_text())["loader"]["env"]["LLAMA_GPU_ENDPOINT"]

    r = make(*base, env=env)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    r = make(*base, "SHM=1", f"ENDPOINT=tcp://127.0.0.1:{port}", env=env)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert endpoint_in_manifest() == f"tcp://127.0.0.1:{port}"
    r = make(*base, "SHM=1", env=env)
    assert r.returncode == 0 and "warning: SHM=1" in r.stderr and "tcp loopback" in r.stderr, r.stderr
    assert endpoint_in_manifest() == {"passthrough": True}
    ipc = f"ipc:///tmp/tsqp-{port}.sock"
    r = make(*base, env={**env, "LLAMA_GPU_ENDPOINT": ipc})  # the builder's shell names one: say it will fail
    assert r.returncode == 0 and f"warning: LLAMA_GPU_ENDPOINT={ipc}" in r.stderr, r.stderr
    assert "does not cross the enclave boundary" in r.stderr
    r = make(*base, f"ENDPOINT={ipc}", env=env)
    assert r.returncode != 0 and "does not cross the enclave boundary" in r.stderr, r.stderr
    r = make(*base, "SHM=1", f"ENDPOINT=tcp://10.0.{rng.randint(0, 255)}.1:{port}", env=env)
    assert r.returncode != 0 and "must be tcp loopback with shm" in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_passes_the_thread_pools_and_refuses_too_few_threads(tmp_path, model_dir):
    rng = random.Random(19)
    omp, blas, interop = rng.randint(2, 32), rng.randint(2, 8), rng.randint(2, 8)
    budget = thread_budget(omp, blas, interop)
    sizes = [f"OMP_THREADS={omp}", f"BLAS_THREADS={blas}", f"INTEROP_THREADS={interop}"]
    r = make("-n", "tee_runner", f"LLAMA_MODEL_PATH={model_dir}", "GRAMINE_MANIFEST=true", *sizes)
    assert r.returncode == 0, r.stderr
    assert f"-Domp_threads={omp} -Dblas_threads={blas} -Dinterop_threads={interop}" in r.stdout
    base = ["check", f"CHECK_DIR={tmp_path}", f"LLAMA_MODEL_PATH={model_dir}", *sizes]
    assert make(*base, f"MAX_THREADS={budget}").returncode == 0
    m = tomllib.loads((tmp_path / "tee_runner.manifest.check").read_text())
    assert m["sgx"]["max_threads"] == budget and m["loader"]["env"]["OPENBLAS_NUM_THREADS"] == str(blas)
    r = make(*base, f"MAX_THREADS={budget - 1}")
    assert r.returncode != 0 and f"is below the thread budget of {budget}" in r.stderr, r.stderr


def test_docs_cover_every_build_setting():
    """docs/gramine.md names every setting the Makefile takes, and no longer offers a server manifest."""
    header = re.sub(r"\n#\s*", " ", (GRAMINE_DIR / "Makefile").read_text().split("\n\n", 1)[0])
    names = re.findall(r"\b[A-Z][A-Z_]+\b", header.split("overridden on the command line:", 1)[1])
    assert {"MAX_THREADS", "OMP_THREADS", "BLAS_THREADS", "INTEROP_THREADS", "ENDPOINT", "SHM"} <= set(names)
    docs = (ROOT / "docs" / "gramine.md").read_text()
    for name in names:
        assert name in docs, name
    assert "server.manifest" not in docs and "netlink" in docs
