"""Headless Chromium driven over the DevTools protocol, just enough for the status page's
tests and benchmark: open pages, evaluate script in them, wait for a condition with a
deadline, take a screenshot, and list every request a page made.

Chromium is kept off the network: every host name but 127.0.0.1 fails to resolve, and its
background services (updates, safe browsing, metrics) are off.
"""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import websocket


def wait_until(check, seconds, what, every=0.2):
    """Calls `check` until it returns something truthy, and returns that; fails after
    `seconds` naming `what` and the last value. The one poll of the page's tests and
    benchmark: every condition waited for has its deadline, however loaded the machine."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what} (last: {value!r})")
        time.sleep(every)


def wait_for_service(origin, process, seconds=60):
    """Waits until the service `process` answers on `origin`; fails at once if it exits."""
    def answers():
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}")
        try:
            urllib.request.urlopen(origin + "/ui/status.css", timeout=5).read()
            return True
        except OSError:
            return False
    wait_until(answers, seconds, f"the service on {origin}")


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One tab, over its own DevTools connection. Events that arrive while waiting for an
    answer are kept in `events`."""

    def __init__(self, url):
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.last_id = 0
        self.events = []

    def call(self, method, **params):
        self.last_id += 1
        ident = self.last_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, seconds, what):
        """Evaluates `expression` until it is true; fails after `seconds` saying `what`."""
        def holds():
            try:
                return self.evaluate(expression) is True
            except RuntimeError:  # a navigation replaced the context meanwhile: ask again
                return False
        wait_until(holds, seconds, what)

    def drain(self, seconds=0.5):
        """Collects the events that arrive within `seconds`."""
        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except (websocket.WebSocketTimeoutException, TimeoutError):
            pass
        finally:
            self.ws.settimeout(60)

    def requested(self):
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def problems(self):
        """Script exceptions, and console or log errors (a refused load, a CSP violation)."""
        found = []
        for event in self.events:
            method = event.get("method")
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                found.append(event["params"]["entry"]["text"])
            elif method == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                found.append(json.dumps(event["params"]["args"])[:500])
        return found

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(path, "wb") as out:
            out.write(base64.b64decode(data))

    def close(self):
        self.ws.close()


class Browser:
    """A headless Chromium with a profile of its own, removed on close."""

    def __init__(self, width=1400, height=1000):
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("no chromium (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="vmpool-chromium-")
        flags = [
            "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
            "--no-pings", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen([binary, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")

        def endpoint():
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            return os.path.exists(port_file) and open(port_file).read().split()[:2]
        try:
            self.port, browser_path = wait_until(endpoint, 60, "chromium's DevTools endpoint", every=0.1)
        except (RuntimeError, AssertionError):
            self.close()
            raise
        self.browser = Page(f"ws://127.0.0.1:{self.port}{browser_path}")

    def open(self, url):
        """A new window at `url` (each its own window, so that every page is visible and its
        script runs as in a browser in front of someone), with its requests, logs and
        exceptions recorded."""
        target = self.browser.call("Target.createTarget", url="about:blank", newWindow=True)["targetId"]
        page = Page(f"ws://127.0.0.1:{self.port}/devtools/page/{target}")
        for domain in ("Network", "Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", url=url)
        return page

    def close(self):
        if getattr(self, "browser", None):
            self.browser.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
