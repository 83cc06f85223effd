"""labs device agent: drives a host's VFIO migration uAPI for a remote controller.

Sent over SSH together with abi.py and hostsys.py (joined by labs/vfio/bundle.py) and run
as root on lab hosts, so it is stdlib only and Python 3.6 compatible (no walrus, no
dataclasses, no annotations future import). The controller imports it in-process for the
framing constants and to run a local agent.

Wire protocol (stdin -> requests, stdout -> replies; stderr is free text):
  request   {"id": N, "op": "...", "args": {...}, "timeout": s}\\n
  reply     {"id": N, "ok": true, "result": ..., "duration": s}\\n
  error     {"id": N, "ok": false, "errno": E, "errname": "EINVAL", "error": "...", "detail": {...}}\\n
Bulk data travels as frames: a 4-byte big-endian length, then that many bytes;
a zero-length frame ends the sequence. Ops in FRAMES_IN read frames that follow
their request line; ops in FRAMES_OUT write frames *before* their reply line
(always ended by the zero frame, even on error).

A watchdog kills the process (exit 3, after a final line with "fatal") when an
op makes no progress for its timeout. Every device and data fd is closed on
every exit path; the kernel does the same when we are killed.
"""

import base64
import errno
import fcntl
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time

from labs.vfio.abi import (
    MIGRATION_FLAGS,
    V1_FIELDS,
    V1_STATE_MASK,
    V1_STATE_NAMES,
    V2_STATE_NAMES,
    V2_STATES,
    VFIO_DEVICE_RESET,
    errname,
    flag_names,
    oserror,
)
from labs.vfio.hostsys import (
    SIM_BACKEND,
    WIDTH_FMT,
    RealSys,
    bitmap_pages,
    device_feature,
    device_info,
    dma_logging_report,
    dma_logging_start,
    dma_logging_stop,
    driver_faults,
    find_migration_region,
    mig_data_size,
    mig_flags,
    mig_get_state,
    mig_set_state,
    open_group_path,
    open_host_device,
    precopy_info,
    read_exact_at,
    region_info,
    sim_backend,
    sysfs_device_path,
    v1_reg_read,
    v1_reg_write,
    write_all_at,
)

AGENT_VERSION = "1.0"
PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------
# the agent process
# ---------------------------------------------------------------------------

FRAMES_IN = frozenset(["data_write", "v1_resume"])
FRAMES_OUT = frozenset(["data_read", "v1_save", "blob"])
FRAME_HDR = struct.Struct(">I")
MAX_FRAME = 64 << 20
DEFAULT_CHUNK = 1 << 20
# Linux's fcntl numbers (Python has the names from 3.10 on)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# a whole frame in the pipe to sshd: the device's next read overlaps the sending of this one. Stdout
# only: resumes gained nothing measurable from a wider stdin, and a non-root user's pipes share a quota
PIPE_BYTES = DEFAULT_CHUNK


class ProtocolError(Exception):
    """A bad request: not the device's fault."""


class OpError(OSError):
    """A device errno plus what had been done when it happened (bytes moved...)."""

    def __init__(self, code, message, detail):
        OSError.__init__(self, code, message)
        self.detail = detail


class Wire(object):
    """Buffered framing over raw fds (stdin's own buffer would swallow frame bytes)."""

    def __init__(self, rfd=0, wfd=1):
        self.rfd = rfd
        self.wfd = wfd
        self.buf = bytearray()
        self.wlock = threading.Lock()

    def _fill(self):
        data = os.read(self.rfd, 1 << 20)
        if not data:
            raise EOFError()
        self.buf += data

    def readline(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_FRAME:
                raise ProtocolError("request line too long")
            self._fill()

    def readexact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_frame(self):
        (n,) = FRAME_HDR.unpack(self.readexact(FRAME_HDR.size))
        if n > MAX_FRAME:
            raise ProtocolError("frame of %d bytes is too large" % n)
        return self.readexact(n) if n else b""

    def _send(self, data):
        view = memoryview(data)
        while len(view):
            n = os.write(self.wfd, view)
            view = view[n:]

    def send_json(self, obj):
        line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        with self.wlock:
            self._send(line)

    def send_frame(self, data):
        with self.wlock:
            self._send(FRAME_HDR.pack(len(data)))
            if data:
                self._send(data)


class Watchdog(object):
    """Kills the agent when the current op makes no progress for its timeout."""

    def __init__(self, wire):
        self.wire = wire
        self.lock = threading.Lock()
        self.deadline = None
        self.timeout = None
        self.current = None
        t = threading.Thread(target=self._run, name="watchdog")
        t.daemon = True
        t.start()

    def arm(self, req_id, op, timeout):
        with self.lock:
            self.current = (req_id, op)
            self.timeout = timeout
            self.deadline = time.monotonic() + timeout if timeout else None

    def touch(self):
        with self.lock:
            if self.timeout:
                self.deadline = time.monotonic() + self.timeout

    def disarm(self):
        with self.lock:
            self.deadline = None
            self.current = None

    def _run(self):
        while True:
            time.sleep(0.02)
            with self.lock:
                fire = self.deadline is not None and time.monotonic() > self.deadline
                current, timeout = self.current, self.timeout
            if fire:
                self._fire(current, timeout)

    def _fire(self, current, timeout):
        req_id, op = current or (None, None)
        message = "watchdog: op %r made no progress for %ss; agent exits" % (op, timeout)
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except Exception:
            pass
        # the main thread may hold the wire mid-frame: only speak if we can get it
        if self.wire.wlock.acquire(timeout=0.5):
            try:
                line = {"id": req_id, "ok": False, "fatal": "watchdog", "errno": None, "errname": None}
                line["error"] = message
                self.wire._send(b"\n" + json.dumps(line).encode() + b"\n")
            except Exception:
                pass
        os._exit(3)


def _summarize(value, depth=0):
    """A transcript-sized copy: long strings cut, big lists shortened."""
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    if isinstance(value, dict):
        if depth > 2:
            return "{...}"
        return dict((k, _summarize(v, depth + 1)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if depth > 2 or len(value) > 16:
            return "[%d items]" % len(value)
        return [_summarize(v, depth + 1) for v in value]
    return value


class Handle(object):
    def __init__(self, hid, kind, sysl, fd, parent=None):
        self.id = hid
        self.kind = kind  # "device" | "data"
        self.sys = sysl
        self.fd = fd
        self.parent = parent
        self.extra_fds = []  # group/container/iommufd, closed after the device
        self.children = []  # data handles of a device
        self.mig_region = None  # cached v1 region info
        self.info = {}


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"))


class Agent(object):
    def __init__(self, wire):
        self.wire = wire
        self.handles = {}
        self.next_handle = 1
        self.default_timeout = 60.0
        self.transcript = []
        self.transcript_limit = 20000
        self.transcript_next = 0  # absolute seq: a long-lived (pooled) agent drops its oldest entries
        self.real = RealSys()
        self.sim = None
        # no cleanup from the watchdog thread: it could block on what hung; os._exit
        # makes the kernel close every fd (and drop the sim device's flock)
        self.watchdog = Watchdog(wire)
        self.closed = False
        self.locks = {}  # reservation name -> (fd, lock path): flocks this process holds

    # -- plumbing -----------------------------------------------------------
    def serve(self):
        while True:
            try:
                line = self.wire.readline()
            except EOFError:
                return
            if not line.strip():
                continue
            try:
                req = json.loads(line.decode())
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                self.wire.send_json(
                    {
                        "id": None,
                        "ok": False,
                        "errno": None,
                        "errname": None,
                        "kind": "protocol",
                        "error": "malformed request line",
                    }
                )
                continue
            if self.handle_request(req, op) == "shutdown":
                return

    def handle_request(self, req, op):
        req_id = req.get("id")
        args = req.get("args") or {}
        timeout = req.get("timeout") or self.default_timeout
        start = time.monotonic()
        entry = {"seq": self.transcript_next, "op": op, "args": _summarize(args), "t": time.time()}
        self.transcript_next += 1
        frames_in = self._frames_in() if op in FRAMES_IN else None
        reply = {"id": req_id}
        self.watchdog.arm(req_id, op, timeout)
        try:
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                raise ProtocolError("unknown op %r" % op)
            if op in FRAMES_IN:
                result = handler(args, frames_in)
            elif op in FRAMES_OUT:
                result = handler(args, self._emit)
            else:
                result = handler(args)
            reply["ok"] = True
            reply["result"] = result
            entry["ok"] = True
            entry["result"] = _summarize(result)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            reply.update(ok=False, errno=code, errname=errname(code), error=exc.strerror or str(exc))
            detail = getattr(exc, "detail", None)
            if getattr(exc, "buffer", None) is not None:
                buf = exc.buffer  # type: ignore[attr-defined]
                detail = dict(detail or {}, buffer={"device_state": buf[0], "data_fd": buf[1]})
            if detail:
                reply["detail"] = detail
            entry.update(ok=False, errno=code, errname=errname(code))
        except (ProtocolError, KeyError, ValueError, TypeError) as exc:
            kind = "protocol" if isinstance(exc, ProtocolError) else "usage"
            reply.update(ok=False, errno=None, errname=None, kind=kind, error="%s: %s" % (type(exc).__name__, exc))
            entry.update(ok=False, error=reply["error"])
        finally:
            if frames_in is not None:
                for _frame in frames_in:  # drain what the controller still sends
                    pass
            if op in FRAMES_OUT:
                self.wire.send_frame(b"")
            self.watchdog.disarm()
        reply["duration"] = entry["duration"] = round(time.monotonic() - start, 6)
        self.transcript.append(entry)
        if len(self.transcript) > self.transcript_limit:
            del self.transcript[: self.transcript_limit // 2]
        self.wire.send_json(reply)
        return op if reply.get("ok") else None

    def _frames_in(self):
        while True:
            frame = self.wire.read_frame()
            self.watchdog.touch()
            if not frame:
                return
            yield frame

    def _emit(self, data):
        self.wire.send_frame(data)
        self.watchdog.touch()

    def _new_handle(self, kind, sysl, fd, parent=None):
        h = Handle(self.next_handle, kind, sysl, fd, parent)
        self.next_handle += 1
        self.handles[h.id] = h
        if parent is not None:
            parent.children.append(h)
        return h

    def _get(self, args, key="dev", kind="device"):
        hid = args.get(key)
        h = self.handles.get(hid)
        if h is None or h.kind != kind:
            raise oserror(errno.EBADF, "no open %s handle %r" % (kind, hid))
        return h

    def _close_handle(self, h):
        for child in list(h.children):
            self._close_handle(child)
        self.handles.pop(h.id, None)
        if h.parent is not None and h in h.parent.children:
            h.parent.children.remove(h)
        first_error = None
        for fd in [h.fd] + list(h.extra_fds):
            try:
                h.sys.close(fd)
            except OSError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def cleanup(self):
        """Close every data fd, then every device fd (and its group/container)."""
        if self.closed:
            return
        self.closed = True
        for name in list(self.locks):
            self._unlock(name)
        for h in [h for h in self.handles.values() if h.kind == "data"]:
            try:
                self._close_handle(h)
            except Exception:
                pass
        for h in list(self.handles.values()):
            try:
                self._close_handle(h)
            except Exception:
                pass

    # -- session ------------------------------------------------------------
    def op_hello(self, args):
        _add_sys_path(args.get("sys_path"))
        if args.get("timeout"):
            self.default_timeout = float(args["timeout"])
        uname = os.uname()
        return {
            "agent": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "kernel": uname.release,
            "arch": uname.machine,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "backends": ["real", "sim"],
            "default_timeout": self.default_timeout,
            "sim_host": os.environ.get("LABS_SIM_HOST"),
            "sim_dir": os.environ.get("LABS_SIM_DIR"),
            "dev_vfio": os.path.isdir("/dev/vfio"),
            "vfio_cdev": os.path.isdir("/dev/vfio/devices"),
            "pipe_bytes": pipe_size(self.wire.wfd),
        }

    def op_ping(self, args):
        return {}

    def op_transcript(self, args):
        """Entries with seq >= since (those still kept)."""
        since = int(args.get("since", 0))
        first = self.transcript[0]["seq"] if self.transcript else self.transcript_next
        return self.transcript[max(0, since - first):]

    def op_transcript_seq(self, args):
        """The seq the next request gets: pass it as `since` later to see only what came after."""
        return {"seq": self.transcript_next}

    def op_shutdown(self, args):
        self.cleanup()
        return {"closed": True}

    # -- reservations ---------------------------------------------------------
    # A device reservation is an flock on <lock dir>/<name>.lock with a JSON record beside it in
    # <name>.lock.owner (labs/reservations.py lists, sweeps and clears the same files). This process
    # holds the flock until unlock, its exit or its death: the kernel drops it however it dies.
    def op_lock(self, args):
        name = str(args["name"])
        if "/" in name or name.startswith("."):
            raise ValueError("bad reservation name %r" % name)
        path = os.path.join(_lock_dir(), name + ".lock")
        if name in self.locks:
            return {"locked": False, "owner": _read_text(path + ".owner")}
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError) as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return {"locked": False, "owner": _read_text(path + ".owner")}
            raise
        record = dict(args.get("owner") or {}, holder=os.getpid())
        tmp = "%s.owner.%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            f.write(json.dumps(record) + "\n")
        os.rename(tmp, path + ".owner")
        self.locks[name] = (fd, path)
        return {"locked": True, "holder": os.getpid(), "path": path}

    def op_unlock(self, args):
        if str(args["name"]) not in self.locks:
            raise KeyError("not held: %s" % args["name"])
        self._unlock(str(args["name"]))
        return {}

    def _unlock(self, name):
        fd, path = self.locks.pop(name)
        try:
            os.unlink(path + ".owner")
        except OSError:
            pass
        os.close(fd)

    def op_kmsg(self, args):
        """Kernel log records with a sequence number above `after` (dmesg's format), at most `limit`,
        and the kernel's taint mask;
        `after` < 0 reads none, only the newest sequence number (a cursor for later). Reading
        /dev/kmsg here spares the controller an SSH exec (a session, a shell, dmesg) per test."""
        after = int(args.get("after", -1))
        limit = int(args.get("limit", 400))
        tainted = None  # /proc/sys/kernel/tainted, world-readable even where dmesg is restricted
        try:
            with open("/proc/sys/kernel/tainted") as f:
                tainted = int(f.read().strip())
        except (OSError, ValueError):
            pass
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return {"seq": None, "lines": [], "tainted": tainted, "error": errname(exc.errno or errno.EIO)}
        last, lines = after, []
        try:
            while True:
                try:
                    record = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EPIPE:  # records overwritten under us: go on with the next
                        continue
                    if exc.errno == errno.EAGAIN:
                        break
                    raise
                head, _, text = record.decode("utf-8", "replace").partition(";")
                fields = head.split(",")
                seq, usec = int(fields[1]), int(fields[2])
                last = max(last, seq)
                if 0 <= after < seq:
                    lines.append("[%5d.%06d] %s" % (usec // 1000000, usec % 1000000, text.split("\n")[0]))
        finally:
            os.close(fd)
        return {"seq": last, "lines": lines[-limit:], "tainted": tainted}

    def op_sleep(self, args):
        """For watchdog tests: sleep without progress."""
        time.sleep(float(args.get("seconds", 1)))
        return {}

    def op_blob(self, args, emit):
        """Stream `length` zero bytes (link throughput probe)."""
        length = int(args["length"])
        chunk = bytes(min(int(args.get("chunk", DEFAULT_CHUNK)), max(length, 1)))
        sent = 0
        while sent < length:
            n = min(len(chunk), length - sent)
            emit(chunk[:n])
            sent += n
        return {"bytes": sent}

    # -- devices ------------------------------------------------------------
    def _sim_kernel(self):
        if self.sim is None:
            self.sim = sim_backend(SIM_BACKEND)
        return self.sim

    def op_open(self, args):
        kind = args["kind"]
        if kind == "sim":
            _add_sys_path(args.get("sys_path"))
            sysl = self._sim_kernel()
            name = args.get("name") or "sim0"
            state_dir = args.get("state_dir") or self._default_state_dir(name)
            sysfs = sysl.plug(name, args["driver"], args.get("options") or {}, state_dir)
            dfd, extra, info = open_group_path(sysl, sysfs, name)
            info["state_dir"] = state_dir
        else:
            sysl = self.real
            address = args.get("address") or args.get("uuid")
            if not address:
                raise ProtocolError("open %s needs an address or uuid" % kind)
            dfd, extra, info = open_host_device(sysl, kind, address, args.get("path", "auto"), args.get("noiommu"))
            info["sysfs"] = sysfs_device_path(kind, address)
        h = self._new_handle("device", sysl, dfd)
        h.extra_fds = extra
        info.update(handle=h.id, backend=sysl.name, fd=dfd)
        h.info = info
        return info

    def _default_state_dir(self, name):
        base = os.environ.get("LABS_SIM_DIR")
        host = os.environ.get("LABS_SIM_HOST")
        if not base or not host:
            raise ProtocolError("sim open needs state_dir (or LABS_SIM_DIR and LABS_SIM_HOST)")
        return os.path.join(base, "hosts", host, "devices", name)

    def op_close(self, args):
        self._close_handle(self._get(args))
        return {}

    def op_close_fd(self, args):
        self._close_handle(self._get(args, "fd", "data"))
        return {}

    def op_handles(self, args):
        return [{"handle": h.id, "kind": h.kind, "fd": h.fd, "backend": h.sys.name} for h in self.handles.values()]

    def op_device_info(self, args):
        h = self._get(args)
        return device_info(h.sys, h.fd)

    def op_region_info(self, args):
        h = self._get(args)
        return region_info(h.sys, h.fd, int(args["index"]))

    def op_find_migration_region(self, args):
        h = self._get(args)
        h.mig_region = find_migration_region(h.sys, h.fd)
        return h.mig_region

    def op_region_read(self, args):
        h = self._get(args)
        base = region_info(h.sys, h.fd, int(args["index"]))["offset"]
        data = h.sys.pread(h.fd, int(args["length"]), base + int(args.get("offset", 0)))
        return {"data": _b64(data), "length": len(data)}

    def op_region_write(self, args):
        h = self._get(args)
        base = region_info(h.sys, h.fd, int(args["index"]))["offset"]
        n = h.sys.pwrite(h.fd, _unb64(args["data"]), base + int(args.get("offset", 0)))
        return {"written": n}

    def op_reset(self, args):
        h = self._get(args)
        return {"ret": h.sys.ioctl(h.fd, VFIO_DEVICE_RESET, 0)}

    def op_fd_info(self, args):
        h = self.handles.get(args.get("fd"))
        if h is None:
            raise oserror(errno.EBADF, "no handle %r" % args.get("fd"))
        return {"fd": h.fd, "kind": h.kind, "cloexec": h.sys.cloexec(h.fd)}

    def op_driver_faults(self, args):
        """A real driver's labs fault knobs (module parameters): the sim drivers' `faults` spec. The device
        by an open handle, or by kind and address while another user (QEMU) holds it."""
        if "dev" in args:
            h = self._get(args)
            if not h.info.get("sysfs"):
                raise oserror(errno.EOPNOTSUPP, "driver_faults: handle %d is not a real device" % h.id)
            sysfs = h.info["sysfs"]
        else:
            sysfs = sysfs_device_path(args["kind"], args["address"])
        return driver_faults(sysfs, args.get("spec") or {})

    def op_sim_control(self, args):
        h = self._get(args)
        driver = h.sys.driver_for(h.fd)
        return driver.control(args["action"], args.get("params") or {})

    # -- v1 -------------------------------------------------------------------
    def _mig_region(self, h):
        if h.mig_region is None:
            h.mig_region = find_migration_region(h.sys, h.fd)
            if h.mig_region is None:
                raise oserror(errno.ENODEV, "device has no v1 migration region (type 3, subtype 1)")
        return h.mig_region

    def _field(self, args):
        if "field" in args:
            if args["field"] not in V1_FIELDS:
                raise ProtocolError("unknown v1 field %r" % args["field"])
            return V1_FIELDS[args["field"]]
        width = int(args.get("width", 4))
        if width not in WIDTH_FMT:
            raise ProtocolError("width must be 1, 2, 4 or 8")
        return int(args["offset"]), width

    def op_v1_read(self, args):
        h = self._get(args)
        offset, width = self._field(args)
        value = v1_reg_read(h.sys, h.fd, self._mig_region(h)["offset"], offset, width)
        out = {"value": value}
        if offset == 0 and width == 4:
            out["name"] = V1_STATE_NAMES[value & V1_STATE_MASK]
        return out

    def op_v1_write(self, args):
        h = self._get(args)
        offset, width = self._field(args)
        v1_reg_write(h.sys, h.fd, self._mig_region(h)["offset"], offset, width, int(args["value"]))
        return {}

    def op_v1_save(self, args, emit):
        """The save iteration of spec 2.4, one frame per chunk (chunk boundaries kept, V1-R18)."""
        h = self._get(args)
        base = self._mig_region(h)["offset"]
        max_bytes = args.get("max_bytes")
        max_chunks = args.get("max_chunks")
        digest = hashlib.sha256()
        sizes = hashlib.sha256()  # the data_size sequence the device reported (V1-R18)
        total = chunks = empty = 0
        end = "done"
        rd = lambda name: v1_reg_read(h.sys, h.fd, base, V1_FIELDS[name][0], V1_FIELDS[name][1])  # noqa: E731
        try:
            pending = rd("pending_bytes")
            while pending > 0:
                if max_bytes is not None and total >= max_bytes:
                    end = "limit"
                    break
                if max_chunks is not None and chunks >= max_chunks:
                    end = "limit"
                    break
                data_offset = rd("data_offset")
                size = rd("data_size")
                if size == 0:
                    empty += 1
                    if empty > 16:  # the driver offers nothing while claiming pending data
                        end = "stalled"
                        break
                else:
                    empty = 0
                    data = read_exact_at(h.sys, h.fd, size, base + data_offset)
                    digest.update(data)
                    sizes.update(struct.pack("<Q", size))
                    total += size
                    chunks += 1
                    emit(data)
                pending = rd("pending_bytes")
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest()}
            ) from exc
        return {
            "bytes": total,
            "chunks": chunks,
            "sha256": digest.hexdigest(),
            "sizes_sha256": sizes.hexdigest(),
            "end": end,
            "pending": pending,
        }

    def op_v1_resume(self, args, frames):
        """Spec 2.5 for each frame: read data_offset, write the chunk there, write data_size."""
        h = self._get(args)
        base = self._mig_region(h)["offset"]
        digest = hashlib.sha256()
        sizes = hashlib.sha256()  # the data_size sequence written: one transaction per frame (V1-R18)
        total = chunks = 0
        try:
            for chunk in frames:
                data_offset = v1_reg_read(h.sys, h.fd, base, 16, 8)
                write_all_at(h.sys, h.fd, chunk, base + data_offset)
                v1_reg_write(h.sys, h.fd, base, 24, 8, len(chunk))
                digest.update(chunk)
                sizes.update(struct.pack("<Q", len(chunk)))
                total += len(chunk)
                chunks += 1
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "chunks": chunks, "sha256": digest.hexdigest(), "sizes_sha256": sizes.hexdigest()}

    # -- v2 -------------------------------------------------------------------
    def op_feature(self, args):
        h = self._get(args)
        payload = _unb64(args.get("payload", ""))
        ret, out = device_feature(h.sys, h.fd, int(args["flags"]), payload, args.get("argsz"))
        return {"ret": ret, "payload": _b64(out)}

    def op_mig_flags(self, args):
        h = self._get(args)
        flags = mig_flags(h.sys, h.fd)
        return {"flags": flags, "names": flag_names(flags, MIGRATION_FLAGS)}

    def op_mig_get_state(self, args):
        h = self._get(args)
        state, data_fd = mig_get_state(h.sys, h.fd)
        return {"state": state, "name": V2_STATE_NAMES.get(state, "?%d" % state), "data_fd": data_fd}

    def op_mig_set_state(self, args):
        h = self._get(args)
        state = args["state"]
        if not isinstance(state, int):
            state = V2_STATES[state]
        data_fd, bstate = mig_set_state(h.sys, h.fd, state)
        out = {"data_fd": None, "fd": data_fd, "buffer_state": bstate}
        if data_fd >= 0:
            out["data_fd"] = self._new_handle("data", h.sys, data_fd, h).id
        return out

    def op_mig_data_size(self, args):
        h = self._get(args)
        return {"stop_copy_length": mig_data_size(h.sys, h.fd)}

    def op_dma_logging_start(self, args):
        h = self._get(args)
        ranges = [(int(i), int(n)) for i, n in args.get("ranges") or []]
        return {"page_size": dma_logging_start(h.sys, h.fd, int(args["page_size"]), ranges)}

    def op_dma_logging_stop(self, args):
        h = self._get(args)
        dma_logging_stop(h.sys, h.fd)
        return {}

    def op_dma_logging_report(self, args):
        h = self._get(args)
        bitmap = dma_logging_report(h.sys, h.fd, int(args["iova"]), int(args["length"]), int(args["page_size"]))
        return {"bitmap": _b64(bitmap), "pages": bitmap_pages(bitmap)}

    def op_precopy_info(self, args):
        h = self._get(args, "fd", "data")
        return precopy_info(h.sys, h.fd, args.get("argsz"))

    def op_fd_read(self, args):
        """One read() (or pread() with offset): for rule tests on the raw fd."""
        h = self._get(args, "fd", "data")
        if args.get("offset") is not None:
            data = h.sys.pread(h.fd, int(args["length"]), int(args["offset"]))
        else:
            data = h.sys.read(h.fd, int(args["length"]))
        return {"data": _b64(data), "length": len(data)}

    def op_fd_write(self, args):
        h = self._get(args, "fd", "data")
        data = _unb64(args["data"])
        if args.get("offset") is not None:
            n = h.sys.pwrite(h.fd, data, int(args["offset"]))
        else:
            n = h.sys.write(h.fd, data)
        return {"written": n}

    def op_data_read(self, args, emit):
        """read() until 0 (EOF, or 'nothing now' on the sample mdev in PRE_COPY), ENOMSG or the limit."""
        h = self._get(args, "fd", "data")
        limit = args.get("limit")
        chunk = int(args.get("chunk", DEFAULT_CHUNK))
        digest = hashlib.sha256()
        total = reads = 0
        end = "eof"
        try:
            while True:
                want = chunk if limit is None else min(chunk, limit - total)
                if want <= 0:
                    end = "limit"
                    break
                try:
                    data = h.sys.read(h.fd, want)
                except OSError as exc:
                    if exc.errno == errno.ENOMSG:
                        end = "enomsg"
                        break
                    raise
                reads += 1
                if not data:
                    break
                digest.update(data)
                total += len(data)
                emit(data)
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "reads": reads, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "reads": reads, "sha256": digest.hexdigest(), "end": end}

    def op_data_write(self, args, frames):
        """One write() per frame (looping on short writes): frames are the write sizes."""
        h = self._get(args, "fd", "data")
        digest = hashlib.sha256()
        total = writes = 0
        try:
            for frame in frames:
                view = memoryview(frame)
                while len(view):
                    n = h.sys.write(h.fd, bytes(view))
                    writes += 1
                    if n <= 0:
                        raise oserror(errno.EIO, "write returned %d" % n)
                    digest.update(view[:n])
                    total += n
                    view = view[n:]
        except OSError as exc:
            raise OpError(
                exc.errno, exc.strerror or str(exc), {"bytes": total, "writes": writes, "sha256": digest.hexdigest()}
            ) from exc
        return {"bytes": total, "writes": writes, "sha256": digest.hexdigest()}


def _lock_dir():
    """Where reservations live: a sim host's own directory of its sim lab, else /run/labs/locks,
    else a per-user directory under TMPDIR (a user who cannot write /run)."""
    if os.environ.get("LABS_SIM_DIR"):
        d = os.path.join(os.environ["LABS_SIM_DIR"], "hosts", os.environ.get("LABS_SIM_HOST", ""), "locks")
    else:
        d = "/run/labs/locks"
        try:
            _makedirs(d)
        except OSError:
            pass
        if not os.access(d, os.W_OK):
            d = os.path.join(os.environ.get("TMPDIR") or "/tmp", "labs-locks-%d" % os.getuid())
    _makedirs(d)
    return d


def _makedirs(d):
    try:
        os.makedirs(d)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return ""


def _add_sys_path(entries):
    """Put `entries` first on sys.path, in their order: the labs checkout before a host's python_path."""
    sys.path[0:0] = [e for e in entries or [] if e not in sys.path]


def pipe_size(fd):
    """The fd's pipe buffer in bytes; None where it is not a pipe."""
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except (OSError, IOError):
        return None


def widen_pipe(fd, size=PIPE_BYTES):
    """The fd's pipe buffer raised to `size` where it is a smaller pipe."""
    current = pipe_size(fd)
    if current is not None and current < size:
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except (OSError, IOError):  # over pipe-max-size for this user: the default buffer stays
            pass


def main():
    wire = Wire(0, 1)
    widen_pipe(1)
    agent = Agent(wire)

    def _terminate(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            signal.signal(sig, _terminate)
        except (ValueError, OSError):
            pass
    try:
        agent.serve()
    finally:
        agent.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
