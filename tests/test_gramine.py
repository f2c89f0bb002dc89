"""Checks for the Gramine manifest template in gramine/ (no Gramine installation needed).

The TEE side's template is rendered with gramine/render.py, a stand-in for ``gramine-manifest`` that
uses the same Jinja2 settings (StrictUndefined) and the same globals. Nothing from tee_runner.py,
server.py or the tsqp package is imported: only the rendered manifest is checked. The Makefile, and
tee_runner.py run with the manifest's environment, are checked in test_gramine_build.py.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import shutil
import subprocess
import sys
import sysconfig
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
