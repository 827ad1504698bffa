"""Runs a pod's curl sidecar for real, as a host subprocess: part of the kubelet TEST DOUBLE.

The kubelet stand-in of kube_api_double.py calls this for containers whose
image is curlimages/curl, so the in-pod shell scripts stack ships (such as
manifests/allegrograph-member.sh) run with the host's sh and curl instead
of being simulated. Every HTTP request they make goes through the API
double's own HTTP server as an `http_proxy` (absolute-form requests), which
resolves the host the way the pod's DNS would and hands the request to a
node of a database double.

What it does like a kubelet, and where it cannot:

- `files` ({mount_path: {filename: text | bytes | (text, mode)}}, the
  ConfigMap and Secret volumes; a value that is not a dict is one file
  mounted at mount_path, a subPath mount) are materialised in a fresh temporary
  directory per container start, mode 0644 unless given (a ConfigMap's
  defaultMode), and absolute paths under a mount path in the command and
  in env values are rewritten into it; paths inside the files themselves
  are not, and other absolute paths (/bin/sh, /tmp) are the host's;
- the environment is exactly the given env plus `http_proxy` (start's
  `proxy`, default http://127.0.0.1:PROXY_PORT; the kubelet double puts
  the pod in it as proxy credentials, http://NS:POD@127.0.0.1:PORT, so it
  knows which pod a request comes from) and the host's PATH, nothing else
  (no HOME);
- restartPolicy Always: a container that exits is started again after a
  back-off that doubles from `backoff_seconds` up to `max_backoff_seconds`
  (the real kubelet: 10 s to 300 s), reset after 10 minutes of running;
- stop: SIGTERM to the container's main process, `grace_seconds` to exit,
  then SIGKILL; when the main process ends, whatever it left running is
  killed too, as a container's processes die with it;
- the container's main process gets SIGTERM when this process dies
  (`setpriv --pdeathsig TERM`, when setpriv is there), so no container
  outlives the double; kill_all() SIGKILLs every container at once;
- output (stdout and stderr) appended to log_path, each line prefixed by
  `POD_KEY/CONTAINER: `.

Not like a container: the command runs as this user on the host's file
system, and its main process is not PID 1 (a PID 1 with no TERM trap
would ignore SIGTERM and wait for the SIGKILL; here the default action
kills it at once).
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SETPRIV = shutil.which("setpriv")


class _Container:
    def __init__(self, pod_key, name, command, env, files, proxy=None):
        self.pod_key, self.name, self.command, self.env, self.files = pod_key, name, command, env, files
        self.proxy = proxy
        self.proc = None
        self.tmp = None
        self.stopping = threading.Event()
        self.thread = None
        self.restarts = 0


class ContainerRunner:
    def __init__(self, proxy_port, log_path=None, backoff_seconds=10.0, max_backoff_seconds=300.0):
        self.proxy_port = int(proxy_port)
        self.log_path = log_path
        self.backoff = float(backoff_seconds)
        self.max_backoff = float(max_backoff_seconds)
        self.lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.containers = {}      # (pod_key, name) -> _Container

    # ---- the kubelet's side -----------------------------------------------

    def start(self, pod_key, name, command, env, files=None, proxy=None):
        """Run the container (command = its command + args) until stop(); restarted when it exits.

        proxy: the container's http_proxy (default http://127.0.0.1:PROXY_PORT)."""
        if not command:
            raise ValueError(f"container {name} of {pod_key}: no command (the image's entrypoint is not run here)")
        key = (pod_key, name)
        with self.lock:
            old = self.containers.get(key)
            if old is not None and not old.stopping.is_set():
                return
            c = self.containers[key] = _Container(pod_key, name, list(command), dict(env or {}), files or {}, proxy)
            c.thread = threading.Thread(target=self._supervise, args=(c,), daemon=True,
                                        name=f"container {pod_key}/{name}")
            c.thread.start()

    def has(self, pod_key):
        """Does the pod have containers here (running or backing off)?"""
        with self.lock:
            return any(p == pod_key for p, _ in self.containers)

    def running(self, pod_key, name):
        with self.lock:
            c = self.containers.get((pod_key, name))
        return bool(c and c.proc is not None and c.proc.poll() is None)

    def restarts(self, pod_key, name):
        with self.lock:
            c = self.containers.get((pod_key, name))
        return c.restarts if c else 0

    def stop(self, pod_key, grace_seconds=30.0, name=None):
        """Stop the pod's containers (or the one named): SIGTERM, grace_seconds, SIGKILL. Waits for them."""
        with self.lock:
            victims = [c for (p, n), c in self.containers.items() if p == pod_key and (name is None or n == name)]
            for c in victims:
                self.containers.pop((c.pod_key, c.name), None)
                c.stopping.set()
        for c in victims:
            proc = c.proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=grace_seconds)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc)
                except ProcessLookupError:
                    pass
        for c in victims:
            if c.thread is not None:
                c.thread.join(timeout=5)

    def kill_all(self):
        """SIGKILL every container at once (this process is going away)."""
        with self.lock:
            victims = list(self.containers.values())
            self.containers.clear()
        for c in victims:
            c.stopping.set()
            if c.proc is not None and c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 2.0
        for c in victims:
            if c.thread is not None:
                c.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def stop_all(self, grace_seconds=5.0):
        with self.lock:
            pods = {p for p, _ in self.containers}
        for p in pods:
            self.stop(p, grace_seconds)

    # ---- one container ------------------------------------------------------

    def _materialise(self, c):
        tmp = tempfile.mkdtemp(prefix="container-")
        mounts = {}
        for mount, entries in c.files.items():
            mount = "/" + mount.strip("/")
            target = os.path.join(tmp, mount.lstrip("/"))
            if not isinstance(entries, dict):
                # One file mounted at this path (a subPath mount).
                entries = {os.path.basename(target): entries}
                target = os.path.dirname(target)
                os.makedirs(target, exist_ok=True)
                for filename, value in entries.items():
                    self._write_file(os.path.join(target, filename), value)
                mounts[mount] = os.path.join(target, os.path.basename(mount))
                continue
            os.makedirs(target, exist_ok=True)
            for filename, value in (entries or {}).items():
                self._write_file(os.path.join(target, filename), value)
            mounts[mount] = target
        return tmp, mounts

    @staticmethod
    def _write_file(path, value):
        mode = 0o644
        if isinstance(value, tuple):
            value, mode = value
        data = value.encode() if isinstance(value, str) else value
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    @staticmethod
    def _rewrite(arg, mounts):
        # Longest mount first, so /etc/a/b wins over /etc/a.
        for mount in sorted(mounts, key=len, reverse=True):
            arg = re.sub(r"(?<![\w./-])" + re.escape(mount) + r"(?=/|$|[\s'\";|&)])",
                         lambda _m, t=mounts[mount]: t, arg)
        return arg

    def _supervise(self, c):
        delay = self.backoff
        while not c.stopping.is_set():
            if c.tmp:
                shutil.rmtree(c.tmp, ignore_errors=True)
            c.tmp, mounts = self._materialise(c)
            env = {k: self._rewrite(v, mounts) for k, v in c.env.items()}
            env["http_proxy"] = c.proxy or f"http://127.0.0.1:{self.proxy_port}"
            env["PATH"] = os.environ.get("PATH") or DEFAULT_PATH
            argv = [self._rewrite(a, mounts) for a in c.command]
            if SETPRIV:
                argv = [SETPRIV, "--pdeathsig", "TERM", "--"] + argv
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, env=env, cwd=c.tmp, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                self._write(c, f"failed to start: {e}\n")
                proc = None
            if proc is not None:
                c.proc = proc
                if c.stopping.is_set():
                    self._kill_group(proc)   # stopped (kill_all) while it was being started
                reader = threading.Thread(target=self._pump, args=(c, proc), daemon=True)
                reader.start()
                code = proc.wait()
                self._kill_group(proc)       # the container's other processes die with it
                reader.join(timeout=5)
                self._write(c, f"exited with code {code}\n")
            if c.stopping.is_set():
                break
            if time.monotonic() - started > 600:
                delay = self.backoff
            c.restarts += 1
            if c.stopping.wait(delay):
                break
            delay = min(delay * 2, self.max_backoff)
        if c.tmp:
            shutil.rmtree(c.tmp, ignore_errors=True)

    @staticmethod
    def _kill_group(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _pump(self, c, proc):
        for line in iter(proc.stdout.readline, b""):
            self._write(c, line.decode("utf-8", "replace"))
        proc.stdout.close()

    def _write(self, c, text):
        if not self.log_path:
            return
        if not text.endswith("\n"):
            text += "\n"
        try:
            with self.log_lock, open(self.log_path, "a") as f:
                f.write(f"{c.pod_key}/{c.name}: {text}")
        except OSError:
            pass
