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

import websocket


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
        """Evaluates `expression` until it is truthy; fails after `seconds` saying `what`."""
        deadline = time.monotonic() + seconds
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as error:  # a navigation replaced the context meanwhile
                value = str(error)
            if value is True:
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {seconds}s waiting for {what} (last: {value!r})")

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
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        self.port, browser_path = open(port_file).read().split()[:2]
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
