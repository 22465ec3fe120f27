"""Headless Chromium over the Chrome DevTools Protocol, for tests that need
a real browser (examples/live.html against live channels).

Only the `websockets` sync client and the standard library: selenium or
playwright would bring their own browser downloads and drivers, while CDP
needs nothing but the Debian `chromium` package.

    with Chromium() as browser:
        page = browser.open("http://127.0.0.1:8000/live.html?...")
        page.wait_for("document.querySelector('#status').textContent == 'connected'")

Everything listens on and connects to 127.0.0.1 only.
"""

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from websockets.sync.client import connect

from receivers import free_port

HOST = "127.0.0.1"
# An explicit empty ProxyHandler: a proxy from the environment must never
# see requests meant for the browser on loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CdpError(RuntimeError):
    """The browser answered a command with an error."""


class JsError(CdpError):
    """The evaluated JavaScript threw."""


def _http(url, method="GET", timeout=5.0):
    req = urllib.request.Request(url, method=method)
    with _HTTP.open(req, timeout=timeout) as resp:
        return resp.read().decode()


class Chromium:
    """One headless browser process with a throwaway profile."""

    BINARIES = ("chromium", "chromium-browser", "google-chrome")
    FLAGS = (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # small /dev/shm in containers crashes renderers
        "--disable-background-networking",  # no update or safe-browsing traffic
        "--no-first-run",
        "--no-default-browser-check",
    )

    def __init__(self, binary=None):
        self.binary = binary or next(filter(None, map(shutil.which, self.BINARIES)), None)
        if not self.binary:
            raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
        self.proc = None
        self.profile = None
        self.port = None
        self.log = None
        self.version = None  # /json/version, once started
        self.start_seconds = None
        self.pages = []

    @property
    def base(self):
        return f"http://{HOST}:{self.port}"

    def start(self, timeout=20.0):
        self.profile = tempfile.mkdtemp(prefix="pg_emit-chromium-")
        self.port = free_port()
        args = [
            self.binary,
            *self.FLAGS,
            f"--user-data-dir={self.profile}",
            f"--remote-debugging-address={HOST}",
            f"--remote-debugging-port={self.port}",
            "about:blank",
        ]
        self.log = os.path.join(self.profile, "chromium.log")
        started = time.monotonic()
        with open(self.log, "wb") as log:
            # A session of its own: close() can end the renderers and helpers
            # along with the browser, and nothing else.
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = started + timeout
        while True:
            try:
                self.version = json.loads(_http(self.base + "/json/version", timeout=1.0))
                break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self._log_tail()
                self.close()
                raise RuntimeError(f"chromium did not answer on {self.base}:\n{tail}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - started
        return self

    def open(self, url, timeout=10.0):
        """A new tab on `url`, attached and ready once the document has loaded."""
        # Chromium unescapes everything after "?" as the URL; unquoted, a
        # query string in `url` would be cut at its first "&".
        new = self.base + "/json/new?" + urllib.parse.quote(url, safe="")
        try:
            target = json.loads(_http(new, method="PUT"))
        except urllib.error.HTTPError:
            # Since Chromium 111 /json/new wants PUT (GET gets 405, a guard
            # against drive-by navigation); some older builds want GET.
            target = json.loads(_http(new))
        page = Page(self, target)
        self.pages.append(page)
        if url != "about:blank":
            page.wait_for(
                "location.href !== 'about:blank' && document.readyState === 'complete'",
                timeout=timeout,
            )
        return page

    def close(self):
        for page in list(self.pages):
            page.close()
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
            self.proc = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def _log_tail(self, lines=30):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class Page:
    """One tab, driven over its own DevTools WebSocket."""

    def __init__(self, browser, target):
        self.browser = browser
        self.target_id = target["id"]
        # No Origin header (Chromium would want --remote-allow-origins for
        # one), no proxy, no size limit (screenshots are megabytes). Entered
        # as a context manager (websockets 17 warns otherwise); close() ends it.
        self.ws = connect(
            target["webSocketDebuggerUrl"],
            proxy=None,
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=10,
        ).__enter__()
        self._ids = itertools.count(1)
        self._console = []
        self.call("Runtime.enable")
        # Log carries what the page's own console shows but the Runtime domain
        # does not: CORS refusals, failed EventSource and WebSocket requests.
        self.call("Log.enable")

    def call(self, method, params=None, timeout=30.0):
        """Send one command and return its result; events that arrive in the
        meantime are not replies, the console ones are kept."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{method}: no reply within {timeout} s")
            msg = json.loads(self.ws.recv(timeout=remaining))
            if "id" not in msg:
                self._event(msg)
            elif msg["id"] == msg_id:
                if "error" in msg:
                    error = msg["error"]
                    raise CdpError(f"{method}: {error.get('message')} {error.get('data', '')}".rstrip())
                return msg.get("result", {})
            # Any other id is the late reply to a command that timed out.

    def eval(self, js):
        return _value(self._evaluate(js))

    def wait_for(self, js, timeout=10.0, interval=0.05):
        """Poll `js` until it is truthy and return its value. Truthy as in
        JavaScript, since `js` is: a found element counts (it comes back as
        an empty dict), an empty array counts too. A throw counts as not yet:
        during a navigation, or before the element it reads exists."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                result = self._evaluate(js)
                last = _value(result)
                if _truthy(result):
                    return last
            except CdpError as e:
                last = e
            if time.monotonic() > deadline:
                break
            time.sleep(interval)
        try:
            text = self.eval("document.body ? document.body.innerText : ''") or ""
        except CdpError as e:
            text = f"<{e}>"
        console = "\n".join(self.console()[-20:])
        raise AssertionError(
            f"timed out after {timeout} s waiting for: {js}\n"
            f"last value: {last!r}\n"
            f"page text:\n{text[:2000]}\n"
            f"console (last 20):\n{console}"
        )

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def console(self):
        """Console messages, uncaught exceptions and browser log entries so
        far, as "level: text" lines."""
        # Take in what arrived since the last command.
        while True:
            try:
                msg = json.loads(self.ws.recv(timeout=0))
            except TimeoutError:
                break
            if "id" not in msg:
                self._event(msg)
        return list(self._console)

    def _evaluate(self, js):
        """The RemoteObject `js` evaluates to, by value."""
        result = self.call(
            "Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise JsError(_exception_text(result["exceptionDetails"]))
        return result["result"]

    def close(self):
        if self in self.browser.pages:
            self.browser.pages.remove(self)
        self.ws.close()
        try:
            _http(f"{self.browser.base}/json/close/{self.target_id}")
        except OSError:
            pass  # the browser is gone already

    def _event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            args = " ".join(_remote_text(a) for a in params.get("args", []))
            self._console.append(f"{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            self._console.append(f"exception: {_exception_text(params['exceptionDetails'])}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            self._console.append(f"{entry['level']}: {entry['text']}{where}")


def _value(obj):
    if "unserializableValue" in obj:  # NaN, Infinity, -0, bigints: not JSON
        text = obj["unserializableValue"]
        return int(text[:-1]) if text.endswith("n") else float(text)
    return obj.get("value")


def _truthy(obj):
    if obj["type"] == "undefined":
        return False
    if obj["type"] == "object":
        return obj.get("subtype") != "null"
    if "unserializableValue" in obj:
        return obj["unserializableValue"] not in ("NaN", "-0", "0n")
    return bool(obj.get("value"))


def _remote_text(obj):
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return obj.get("unserializableValue") or obj.get("description") or obj.get("type", "")


def _exception_text(details):
    exc = details.get("exception") or {}
    return exc.get("description") or details.get("text", "exception")
