#!/usr/bin/python3
"""The man pages: built, clean, complete.

Each POD source in docs/ passes podchecker without an error or a warning;
pod2man converts it without a message; `man -l` renders each built page
without a warning (groff's warnings on).  And nothing is left out:
every QMP command stratad's control socket knows (query-commands) and
every event the daemon emits (the string literals of its sources) is in
strata-qmp(7); every verb of `strata --help` is in strata(1); every long
option of `stratad --help` and every --export key stratad accepts is in
stratad(8).  A new command, event, verb or option without documentation
fails here.

Run:  STRATAD=build/daemon/stratad STRATA_CLI=build/contrib/strata \
      STRATA_SOURCE_ROOT=. STRATA_MAN_DIR=build/docs \
      /usr/bin/python3 tests/docs/test-man-pages.py
"""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SRC = os.environ.get("STRATA_SOURCE_ROOT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..")
MAN = os.environ.get("STRATA_MAN_DIR") or os.path.join(SRC, "build", "docs")
STRATAD = os.environ.get("STRATAD") or os.path.join(SRC, "build", "daemon", "stratad")
CLI = os.environ.get("STRATA_CLI") or os.path.join(SRC, "build", "contrib", "strata")
PAGES = {"stratad": "8", "strata": "1", "strata-qmp": "7"}
# the nbdkit plugin's and filter's pages, built with the modules
if os.path.exists(os.path.join(MAN, "nbdkit-strata-plugin.1")):
    PAGES.update({"nbdkit-strata-plugin": "1", "nbdkit-strata-qcow2-filter": "1"})
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg, flush=True)


_reported = [0]


def ok(msg):
    """Prints msg if no check failed since the last ok()."""
    if len(failures) == _reported[0]:
        print("ok  ", msg, flush=True)
    _reported[0] = len(failures)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


# stratad --help and a refused --export return from main() without freeing
# its option arrays; under LeakSanitizer (abort_on_error) that would cut
# their output short.  Leaks are not what this test is about.
NO_LEAKS = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")


if shutil.which("podchecker") is None or shutil.which("pod2man") is None:
    print("SKIP: podchecker/pod2man (perl) are not installed")
    sys.exit(77)

# 1. podchecker and pod2man, each source
for page, sec in PAGES.items():
    pod = os.path.join(SRC, "docs", page + ".pod")
    p = run(["podchecker", "-warnings", "-warnings", pod])
    msgs = [l for l in (p.stdout + p.stderr).splitlines()
            if "pod syntax OK" not in l]
    check(p.returncode == 0 and not msgs,
          f"podchecker {pod}: exit {p.returncode}\n" + "\n".join(msgs))
    p = run(["pod2man", "--errors=stderr", "--section=" + sec, pod])
    check(p.returncode == 0 and not p.stderr.strip() and p.stdout.startswith(".\\\""),
          f"pod2man {pod}: exit {p.returncode}: {p.stderr}")
ok("podchecker (-warnings -warnings) and pod2man: no error, no warning")


def built(page):
    path = os.path.join(MAN, f"{page}.{PAGES[page]}")
    check(os.path.exists(path), f"{path} was not built")
    return path


# 2. rendering: man -l with groff's warnings
texts = {}
have_man = shutil.which("man") is not None
for page in PAGES:
    path = built(page)
    if have_man:
        env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0",
                   MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
        p = run(["man", "--warnings=w", "-l", path], env=env)
        check(p.returncode == 0 and not p.stderr.strip(),
              f"man -l {path}: exit {p.returncode}, warnings:\n{p.stderr}")
        check(len(p.stdout.splitlines()) > 20, f"man -l {path}: almost nothing rendered")
        # the text as a reader sees it, without overstrike
        texts[page] = re.sub(r".\x08", "", p.stdout)
    else:
        with open(path) as f:
            texts[page] = f.read().replace("\\-", "-").replace("\\&", "")
if have_man:
    ok("man -l renders each page without a warning")
else:
    print("note: man (man-db) is not installed: rendering not checked, "
          "the roff sources are searched instead", flush=True)

# Words are searched in the text with hyphenation and line breaks undone.
flat = {p: re.sub(r"-\n\s*", "-", t) for p, t in texts.items()}


def documented(page, word):
    end = r"(?![\w-])" if re.match(r"[\w-]", word[-1]) else ""
    return re.search(r"(?<![\w-])" + re.escape(word) + end, flat[page]) is not None


# 3. every QMP command of the running daemon's table
d = tempfile.mkdtemp(prefix="strata-man.")
ctl = os.path.join(d, "ctl.sock")
dmn = subprocess.Popen([STRATAD, "--control", ctl, "--listen", "unix:" + os.path.join(d, "nbd")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 30
    while not os.path.exists(ctl):
        check(dmn.poll() is None and time.time() < deadline, "stratad --control did not start")
        if failures:
            sys.exit(1)
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(ctl)
    f = s.makefile("rw")
    json.loads(f.readline())
    for cmd in ("qmp_capabilities", "query-commands"):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()
        r = json.loads(f.readline())
    names = [c["name"] for c in r["return"]]
    s.close()
finally:
    dmn.terminate()
    dmn.wait(timeout=30)
    shutil.rmtree(d, ignore_errors=True)
check(len(names) > 20, f"query-commands: {names}")
for n in names:
    check(documented("strata-qmp", n), f"QMP command {n} is not in strata-qmp.7")
ok(f"strata-qmp(7) documents all {len(names)} QMP commands")

# 4. every event the daemon emits
events = set()
for src in glob.glob(os.path.join(SRC, "daemon", "**", "*.c"), recursive=True):
    with open(src) as fh:
        events |= set(re.findall(r'"((?:BLOCK|JOB)_[A-Z_]+)"', fh.read()))
check(len(events) >= 5, f"events found in daemon/: {sorted(events)}")
for e in sorted(events):
    check(documented("strata-qmp", e), f"event {e} is not in strata-qmp.7")
ok(f"strata-qmp(7) documents all {len(events)} events: {' '.join(sorted(events))}")

# 5. every strata verb
help_text = run([CLI, "--help"], env=NO_LEAKS).stdout
section = help_text.split("Commands:", 1)[1].split("Options:", 1)[0]
verbs = sorted({m for m in re.findall(r"^  ([a-z][a-z-]+)", section, re.M)})
check(len(verbs) >= 10, f"verbs in strata --help: {verbs}")
for v in verbs:
    check(documented("strata", v), f"strata verb {v} is not in strata.1")
for o in sorted(set(re.findall(r"(--[a-z][a-z-]+)", help_text))):
    check(documented("strata", o), f"strata option {o} is not in strata.1")
ok(f"strata(1) documents all {len(verbs)} verbs and their options")

# 6. every stratad option and --export key
help_text = run([STRATAD, "--help"], env=NO_LEAKS).stdout
opts = sorted(set(re.findall(r"(--[a-z][a-z-]+)", help_text)))
check(len(opts) >= 15, f"options in stratad --help: {opts}")
for o in opts:
    check(documented("stratad", o), f"stratad option {o} is not in stratad.8")
p = run([STRATAD, "--export", "file=/nonexistent,no-such-key=1"], env=NO_LEAKS)
m = re.search(r"\(known: ([^)]*)\)", p.stderr)
check(m is not None, f"stratad did not list the export keys: {p.stderr}")
keys = [k.strip() for k in m.group(1).split(",")] if m else []
for k in keys:
    check(documented("stratad", k + "="), f"export key {k}= is not in stratad.8")
ok(f"stratad(8) documents all {len(opts)} options and {len(keys)} export keys")

sys.exit(1 if failures else 0)
