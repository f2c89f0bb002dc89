"""Checks for the Gramine build in gramine/ (no Gramine installation needed).

The TEE side's template is rendered with gramine/render.py, a stand-in for ``gramine-manifest`` that
uses the same Jinja2 settings (StrictUndefined) and the same globals. Nothing from tee_runner.py or
server.py is imported: the rendered manifest is checked, and tee_runner.py is run as a process
with the environment that manifest fixes (the nearest thing to the enclave without SGX).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib

import jinja2
import jinja2.meta
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRAMINE_DIR = ROOT / "gramine"
APPS = ("tee_runner",)  # the server runs natively: there is no manifest for it

# Globals gramine-manifest provides (gen_jinja_env.py) and the -D definitions our Makefile passes.
GRAMINE_GLOBALS = {"gramine", "python", "env", "ldd"}
REQUIRED_DEFINES = {"entrypoint", "arch_libdir", "app_dir", "model_dir"}
OPTIONAL_DEFINES = {"log_level", "venv_dir", "enclave_size", "max_threads", "omp_threads",
                    "blas_threads", "interop_threads", "edmm", "sgx_debug", "ra_type", "protection",
                    "verify", "shm", "endpoint"}
PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"


def _load_render():
    spec = importlib.util.spec_from_file_location("tsqp_gramine_render",
                                                  GRAMINE_DIR / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _load_render()


def template(app: str) -> pathlib.Path:
    return GRAMINE_DIR / f"{app}.manifest.template"


def _entrypoint() -> str:
    exe = sys.executable
    in_venv = sys.prefix != sys.base_prefix
    return os.path.abspath(exe) if in_venv else os.path.realpath(exe)


def _arch_libdir() -> str:
    return "/lib/" + (sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu")


def _env_kwargs() -> dict:
    kw = {"pkglibdir": PKGLIBDIR}
    if shutil.which("ldd") is None:
        kw["ldd_fn"] = lambda *binaries: []
    return kw


@pytest.fixture
def model_dir(tmp_path) -> pathlib.Path:
    d = tmp_path / "llama-model"
    d.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (d / name).write_bytes(b"{}")
    return d


@pytest.fixture
def defines(model_dir) -> dict:
    return {
        "entrypoint": _entrypoint(),
        "arch_libdir": _arch_libdir(),
        "app_dir": str(ROOT),
        "model_dir": str(model_dir),
        "venv_dir": sys.prefix if sys.prefix != sys.base_prefix else "",
        "log_level": "error",
    }


def trusted_uris(manifest: dict) -> list[str]:
    return [tf["uri"] if isinstance(tf, dict) else tf
            for tf in manifest["sgx"]["trusted_files"]]


def covered_by_trusted(path: pathlib.Path | str, manifest: dict) -> bool:
    """Would gramine-manifest's expansion of sgx.trusted_files measure *path*?"""
    path = str(path)
    for uri in trusted_uris(manifest):
        assert uri.startswith("file:"), uri
        p = uri[len("file:"):]
        if p.endswith("/") and path.startswith(p):
            return True
        if p == path:
            return True
    return False


def covered_by_mount(path: pathlib.Path | str, manifest: dict) -> bool:
    path = str(path)
    for m in manifest["fs"]["mounts"]:
        if m.get("type", "chroot") != "chroot":
            continue
        mp = m["path"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            return True
    return False


def all_paths(obj) -> list[str]:
    """Every absolute path mentioned in a parsed manifest (file: URIs, PATH-like lists)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += all_paths(v)
    elif isinstance(obj, list):
        for v in obj:
            out += all_paths(v)
    elif isinstance(obj, str):
        s = obj[len("file:"):] if obj.startswith("file:") else obj
        out += [part for part in s.split(":") if part.startswith("/")]
    return out


def is_home_path(path: str) -> bool:
    return any(path == h or path.startswith(h + "/") for h in ("/root", "/home"))


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("app", APPS)
def test_template_uses_only_gramine_globals_and_known_defines(app):
    text = template(app).read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    used = jinja2.meta.find_undeclared_variables(env.parse(text))
    unknown = used - GRAMINE_GLOBALS - REQUIRED_DEFINES - OPTIONAL_DEFINES
    assert not unknown, f"{app}: variables gramine-manifest/Makefile do not supply: {unknown}"
    assert REQUIRED_DEFINES <= used
    # The header comment documents every -D variable the template uses.
    header = text.split("{%", 1)[0]
    for name in used - GRAMINE_GLOBALS:
        assert name in header, f"{app}: -D{name} not documented in the header comment"


@pytest.mark.parametrize("app", APPS)
def test_render_basic_structure(app, defines):
    m = render.render_manifest(template(app), defines, **_env_kwargs())

    ep = m["libos"]["entrypoint"]
    assert os.path.isabs(ep) and ep == defines["entrypoint"]
    assert covered_by_trusted(ep, m)
    assert covered_by_mount(ep, m)

    libos = f"{PKGLIBDIR}/libsysdb.so"
    assert m["loader"]["entrypoint"]["uri"] == f"file:{libos}"

    # Fixed, measured argv; the host must not be able to pick the script.
    assert m["loader"]["argv"] == [ep, f"{ROOT}/{app}.py"]
    assert "insecure__use_cmdline_argv" not in m["loader"]
    assert "insecure__use_host_env" not in m["loader"]

    # Gramine's patched glibc is mounted at /lib and trusted.
    runtime = f"{PKGLIBDIR}/runtime/glibc"
    assert {"path": "/lib", "uri": f"file:{runtime}"} in m["fs"]["mounts"]
    assert f"file:{runtime}/" in trusted_uris(m)
    assert {"type": "tmpfs", "path": "/tmp"} in m["fs"]["mounts"]

    assert m["sys"]["enable_extra_runtime_domain_names_conf"] is True
    assert m["loader"]["log_level"] == "error"


@pytest.mark.parametrize("app", APPS)
def test_trusted_files_cover_app_and_model(app, defines, model_dir):
    m = render.render_manifest(template(app), defines, **_env_kwargs())
    uris = trusted_uris(m)

    assert f"file:{ROOT}/{app}.py" in uris
    assert f"file:{ROOT}/tsqp/" in uris
    assert covered_by_trusted(ROOT / "tsqp" / "__init__.py", m)
    # The server's entry point is not needed inside this enclave.
    assert not covered_by_trusted(ROOT / "server.py", m)

    for name in ("config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json"):
        assert covered_by_trusted(model_dir / name, m), name
        assert covered_by_mount(model_dir / name, m), name
    assert covered_by_mount(ROOT / f"{app}.py", m)
    assert covered_by_mount(ROOT / "tsqp" / "__init__.py", m)

    # The Python stdlib and site-packages of the entrypoint are measured too.
    assert covered_by_trusted(pathlib.Path(os.__file__).resolve(), m) or \
        covered_by_trusted(os.__file__, m)
    site = sysconfig.get_paths()["purelib"]
    assert covered_by_trusted(os.path.join(site, "jinja2", "__init__.py"), m)
    if defines["venv_dir"]:
        assert f"file:{defines['venv_dir']}/pyvenv.cfg" in uris

    # Allowed (unprotected) files must never cover code or weights.
    for uri in m["sgx"].get("allowed_files", []):
        p = uri[len("file:"):]
        for protected in (str(ROOT), str(model_dir), defines["entrypoint"]):
            assert not protected.startswith(p.rstrip("/")), uri


def test_tee_env_passthrough(defines, model_dir):
    m = render.render_manifest(template("tee_runner"), defines, **_env_kwargs())
    env = m["loader"]["env"]
    assert env["LLAMA_GPU_ENDPOINT"] == {"passthrough": True}
    assert env["PREFILL_TOKEN_LENGTH"] == {"passthrough": True}
    # The model location is pinned to the measured directory, not taken from the host.
    assert env["LLAMA_MODEL_PATH"] == str(model_dir)
    assert "LD_PRELOAD" not in env
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/lib"
    assert m["sgx"]["remote_attestation"] == "dcap"


def test_tee_command_line_carries_the_guarded_modes(defines):
    """Private, verify and shared memory are measured settings: flags in the fixed argv, and
    --shm also mounts /dev/shm as untrusted shared memory. Off by default."""
    plain = render.render_manifest(template("tee_runner"), defines, **_env_kwargs())
    assert all(m.get("type") != "untrusted_shm" for m in plain["fs"]["mounts"])
    assert "dev:/dev/shm/" not in plain["sgx"]["allowed_files"]

    guarded = dict(defines, protection="private", verify="1", shm="1")
    m = render.render_manifest(template("tee_runner"), guarded, **_env_kwargs())
    assert m["loader"]["argv"] == [defines["entrypoint"], f"{ROOT}/tee_runner.py",
                                   "--protection", "private", "--verify", "--shm"]
    assert {"type": "untrusted_shm", "path": "/dev/shm", "uri": "dev:/dev/shm"} in m["fs"]["mounts"]
    assert "dev:/dev/shm/" in m["sgx"]["allowed_files"]
    for uri in m["sgx"]["allowed_files"]:  # still nothing unprotected that holds code or weights
        allowed = uri.split(":", 1)[1].rstrip("/")
        assert not any(p.startswith(allowed) for p in (str(ROOT), defines["model_dir"], defines["entrypoint"])), uri

    m = render.render_manifest(template("tee_runner"), dict(defines, verify="1"), **_env_kwargs())
    assert m["loader"]["argv"][2:] == ["--verify"]
    with pytest.raises(jinja2.UndefinedError, match="protection_must_be_none_or_private"):
        render.render_manifest(template("tee_runner"), dict(defines, protection="secret"), **_env_kwargs())


def thread_budget(omp: int, blas: int, interop: int) -> int:
    """Threads alive at once in the enclave, counted here on their own (docs/gramine.md, "Threads"):
    the main thread, OpenMP's workers, OpenBLAS's workers, torch's inter-op pool, ZeroMQ's I/O and
    reaper, pyzmq's garbage collector and its context's two, Gramine's IPC/async/TLS helpers."""
    return 1 + (omp - 1) + (blas - 1) + interop + 2 + 3 + GRAMINE_HELPER_THREADS


GRAMINE_HELPER_THREADS = 3


def test_thread_pools_are_pinned_and_max_threads_covers_them(defines):
    """Every pool the enclave starts is sized in the measured environment, not by the host's core
    count, and a max_threads below what they add up to is refused at build time."""
    m = render.render_manifest(template("tee_runner"), defines, **_env_kwargs())
    env = m["loader"]["env"]
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"],
            env["TSQP_INTEROP_THREADS"]) == ("8", "8", "1", "1")
    assert m["sgx"]["max_threads"] >= thread_budget(8, 1, 1)

    rng = random.Random(7)
    for _ in range(6):
        omp, blas, interop = rng.randint(1, 48), rng.randint(1, 8), rng.randint(1, 8)
        budget = thread_budget(omp, blas, interop)
        sizes = {"omp_threads": str(omp), "blas_threads": str(blas), "interop_threads": str(interop)}
        m = render.render_manifest(template("tee_runner"), {**defines, **sizes, "max_threads": str(budget)},
                                   **_env_kwargs())
        env = m["loader"]["env"]
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(omp)
        assert env["OPENBLAS_NUM_THREADS"] == str(blas)
        assert env["TSQP_INTEROP_THREADS"] == str(interop)
        assert m["sgx"]["max_threads"] == budget
        with pytest.raises(jinja2.UndefinedError,
                           match=f"max_threads {budget - 1} is below the thread budget of {budget}"):
            render.render_manifest(template("tee_runner"), {**defines, **sizes, "max_threads": str(budget - 1)},
                                   **_env_kwargs())
    for name in ("omp_threads", "blas_threads", "interop_threads"):
        for bad in ("0", "-3", "many"):
            with pytest.raises(jinja2.UndefinedError, match="must be positive integers"):
                render.render_manifest(template("tee_runner"), {**defines, name: bad}, **_env_kwargs())


def test_pinned_endpoint_must_be_able_to_leave_the_enclave(defines):
    """ipc:// never crosses the enclave boundary (Gramine renames UNIX sockets per instance); with
    shm the server shares this host, so the header channel must be tcp loopback."""
    m = render.render_manifest(template("tee_runner"), defines, **_env_kwargs())
    assert m["loader"]["env"]["LLAMA_GPU_ENDPOINT"] == {"passthrough": True}
    assert m["loader"]["env"]["TSQP_ENCLAVE"] == "gramine"

    rng = random.Random(11)
    port = rng.randint(1024, 65535)
    remote = f"tcp://10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}:{port}"
    for endpoint, shm in ((f"tcp://127.0.0.1:{port}", "1"), (f"localhost:{port}", "1"),
                          (f"tcp://[::1]:{port}", "1"), (f"tcp://127.{rng.randint(0, 255)}.0.1:{port}", "1"),
                          (remote, "0"), (f"gpu-host:{port}", "0")):
        m = render.render_manifest(template("tee_runner"), {**defines, "endpoint": endpoint, "shm": shm},
                                   **_env_kwargs())
        assert m["loader"]["env"]["LLAMA_GPU_ENDPOINT"] == endpoint  # pinned: measured, not the host's
    for endpoint, shm, message in ((f"ipc:///tmp/tsqp-{port}.sock", "0", "ipc:// does not cross the enclave"),
                                   (f"ipc:///tmp/tsqp-{port}.sock", "1", "ipc:// does not cross the enclave"),
                                   (f"inproc://tsqp-{port}", "0", "must be tcp"),
                                   (remote, "1", "must be tcp loopback with shm"),
                                   (f"gpu-host:{port}", "1", "must be tcp loopback with shm")):
        with pytest.raises(jinja2.UndefinedError, match=message):
            render.render_manifest(template("tee_runner"), {**defines, "endpoint": endpoint, "shm": shm},
                                   **_env_kwargs())


@pytest.mark.parametrize("app", APPS)
def test_enclave_size_and_threads(app, defines):
    m = render.render_manifest(template(app), defines, **_env_kwargs())
    size = render.parse_size(m["sgx"]["enclave_size"])
    assert size >= 8 << 30
    assert size & (size - 1) == 0, "SGX needs a power-of-two enclave size"
    assert m["sgx"]["max_threads"] >= 16
    assert m["sgx"]["edmm_enable"] is False
    assert m["sgx"]["debug"] is False

    m = render.render_manifest(template(app), {**defines, "enclave_size": "32G", "edmm": "1",
                                               "max_threads": "128", "sgx_debug": "1"},
                               **_env_kwargs())
    assert render.parse_size(m["sgx"]["enclave_size"]) == 32 << 30
    assert m["sgx"]["edmm_enable"] is True and m["sgx"]["use_exinfo"] is True
    assert m["sgx"]["max_threads"] == 128
    assert m["sgx"]["debug"] is True

    # A bare -Dedmm (gramine-manifest passes True) works as well.
    m = render.render_manifest(template(app), {**defines, "edmm": True}, **_env_kwargs())
    assert m["sgx"]["edmm_enable"] is True

    with pytest.raises(render.RenderError):
        render.render_manifest(template(app), {**defines, "enclave_size": "12G"},
                               **_env_kwargs())


@pytest.mark.parametrize("app", APPS)
def test_no_host_home_paths_unless_from_defines(app, defines):
    """Real render: /root or /home may only appear via -D values (or what they imply)."""
    kw = _env_kwargs()
    m = render.render_manifest(template(app), defines, **kw)
    allowed = [str(v) for v in defines.values() if isinstance(v, str) and v.startswith("/")]
    # python.get_sys_path(entrypoint) and ldd(entrypoint) are derived from -Dentrypoint.
    allowed += [str(p) for p in render.python_get_sys_path(defines["entrypoint"])]
    if "ldd_fn" not in kw:
        allowed += render.ldd(defines["entrypoint"])
    for p in all_paths(m):
        if is_home_path(p):
            assert any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed), p


@pytest.mark.parametrize("app", APPS)
def test_no_host_home_paths_hermetic(app, monkeypatch):
    """With host-independent inputs, nothing from the builder's home leaks into the manifest."""
    monkeypatch.setenv("HOME", "/root")
    fake = {
        "entrypoint": "/opt/tsqp/venv/bin/python",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "app_dir": "/srv/tsqp",
        "model_dir": "/srv/models/llama-2-7b",
        "venv_dir": "/opt/tsqp/venv",
        "log_level": "error",
    }
    sys_path = ["/usr/lib/python3.11", "/usr/lib/python3.11/lib-dynload",
                "/opt/tsqp/venv/lib/python3.11/site-packages", "/srv/tsqp"]
    text = render.render(template(app), fake, pkglibdir=PKGLIBDIR, sys_path=sys_path,
                         environ={"HOME": "/root", "USER": "root", "PWD": "/home/someone"},
                         ldd_fn=lambda *b: ["/lib/x86_64-linux-gnu/libc.so.6",
                                            "/usr/lib/x86_64-linux-gnu/libm.so.6",
                                            "/opt/python/lib/libpython3.11.so.1.0"])
    assert "/root" not in text and "/home" not in text
    m = tomllib.loads(text)
    render.check_manifest(m)
    prefixes = ["/opt/tsqp", "/srv/tsqp", "/srv/models/llama-2-7b", "/usr/lib/python3.11",
                PKGLIBDIR, "/lib", "/usr/lib/x86_64-linux-gnu", "/tmp", "/etc/hosts",
                "/opt/python/lib/libpython3.11.so.1.0"]
    for p in all_paths(m):
        assert any(p == q or p.startswith(q + "/") for q in prefixes), p
    # The checkout on sys.path (editable install) is not trusted wholesale.
    assert "file:/srv/tsqp/" not in trusted_uris(m)
    assert "file:/opt/python/lib/libpython3.11.so.1.0" in trusted_uris(m)
    assert covered_by_mount("/opt/python/lib/libpython3.11.so.1.0", m)
    # No duplicate / redundant nested mounts.
    mount_paths = [mm["path"] for mm in m["fs"]["mounts"]]
    assert len(mount_paths) == len(set(mount_paths))
    assert "/opt/tsqp/venv/lib/python3.11/site-packages" not in mount_paths
    assert "/opt/tsqp/venv" in mount_paths


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("missing", sorted(REQUIRED_DEFINES))
def test_missing_define_fails(app, missing, defines):
    partial = {k: v for k, v in defines.items() if k != missing}
    with pytest.raises(jinja2.UndefinedError):
        render.render(template(app), partial, **_env_kwargs())


def test_strict_undefined(tmp_path):
    t = tmp_path / "x.manifest.template"
    t.write_text('libos.entrypoint = "{{ entrypoint }}"\nloader.x = "{{ no_such_variable }}"\n')
    with pytest.raises(jinja2.UndefinedError):
        render.render(t, {"entrypoint": "/usr/bin/python3"})
    # ...and gramine-manifest's globals are there.
    t.write_text('a = "{{ gramine.libos }}"\nb = "{{ gramine.runtimedir() }}"\n'
                 'c = "{{ python.stdlib }}"\nd = "{{ python.distlib }}"\n'
                 'e = "{{ python.implementation.name }}"\nf = "{{ env.get("X", "y") }}"\n'
                 'g = "{{ gramine.runtimedir(libc="musl") }}"\n')
    out = tomllib.loads(render.render(t, {}, pkglibdir="/g", environ={}))
    assert out == {"a": "/g/libsysdb.so", "b": "/g/runtime/glibc", "c": sysconfig.get_paths()[
        "stdlib"], "d": out["d"], "e": sys.implementation.name, "f": "y",
        "g": "/g/runtime/musl"}
    assert out["d"].endswith("/dist-packages")


def test_cli(tmp_path, defines):
    out = tmp_path / "tee_runner.manifest"
    args = [sys.executable, str(GRAMINE_DIR / "render.py"), "--pkglibdir", PKGLIBDIR]
    args += [f"-D{k}={v}" for k, v in defines.items()]
    r = subprocess.run(args + [str(template("tee_runner")), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = tomllib.loads(out.read_text())
    assert m["libos"]["entrypoint"] == defines["entrypoint"]

    bad = [a for a in args if not a.startswith("-Dmodel_dir=")]
    r = subprocess.run(bad + [str(template("tee_runner")), str(tmp_path / "bad")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "model_dir" in r.stderr
    assert not (tmp_path / "bad").exists()


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
