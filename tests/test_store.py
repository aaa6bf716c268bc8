"""helip.store: file:// and s3:// (real weed) put/get/sha256/presign, signed links, retries and StorageError."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from core.errors import StorageError
from helip.links import sign_key, verify_token
from helip.store import FileStore, S3Store, open_store


def _payload(tmp_path: Path, size: int = 300_000) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_store(s3) -> S3Store:
    bucket = "helip-store-" + uuid.uuid4().hex[:8]
    s3.make_bucket(bucket)
    store = open_store(f"s3://{bucket}/pre/fix", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                       s3_secret_key=s3.secret_key, retries=1, backoff=0.05)
    assert isinstance(store, S3Store)
    return store


def test_file_store_roundtrip(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    assert isinstance(store, FileStore)
    src, data = _payload(tmp_path)
    sha, size = store.put_file("jobs/job-1/checkpoints/helip_step5.pt", src)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.exists("jobs/job-1/checkpoints/helip_step5.pt")
    assert not store.exists("jobs/job-1/nothing")
    out = store.get_file("jobs/job-1/checkpoints/helip_step5.pt", tmp_path / "dl" / "x.pt")
    assert out.read_bytes() == data
    assert store.get_bytes("jobs/job-1/checkpoints/helip_step5.pt") == data
    store.put_bytes("jobs/job-1/a.json", b"{}")
    store.put_bytes("jobs/job-2/a.json", b"{}")
    assert store.delete_prefix("jobs/job-1/") == 2
    assert not store.exists("jobs/job-1/a.json") and store.exists("jobs/job-2/a.json")
    assert store.presigned_get("jobs/job-2/a.json", 60) is None  # the API serves file:// itself


def test_file_store_refuses_escaping_keys_and_missing_objects(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", retries=0)
    for bad in ("../etc/passwd", "/abs", "a/../../b", "", "a//b"):
        with pytest.raises(StorageError):
            store.put_bytes(bad, b"x")
    with pytest.raises(StorageError, match="no object"):
        store.get_file("jobs/missing.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.pt.part").exists()


def test_signed_tokens_expire_and_cannot_be_forged() -> None:
    secret = b"s" * 32
    token = sign_key(secret, "jobs/job-1/hard_pairs.parquet", 60, now=1000.0)
    assert verify_token(secret, token, now=1059.0) == "jobs/job-1/hard_pairs.parquet"
    with pytest.raises(StorageError) as exc:
        verify_token(secret, token, now=1061.0)
    assert exc.value.code == "expired_token"
    with pytest.raises(StorageError) as exc:
        verify_token(b"other-secret", token, now=1000.0)
    assert exc.value.code == "invalid_token"
    # Opaque: nothing in the token, decoded at any offset, names the job or the file.
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"job-1" not in raw and b"hard_pairs" not in raw and "job-1" not in token
    # Tampered, spliced with another link, truncated: all refused.
    other = sign_key(secret, "jobs/job-2/hard_pairs.parquet", 60, now=1000.0)
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for bad in (flipped, token[:40] + other[40:], token[:-4], "garbage", "", "x" * 5000):
        with pytest.raises(StorageError) as exc:
            verify_token(secret, bad, now=1000.0)
        assert exc.value.code == "invalid_token"


def test_retries_with_backoff_then_success(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(FileStore):
        calls = 0

        def _put(self, key: str, path: Path) -> None:
            Flaky.calls += 1
            if Flaky.calls <= 2:
                raise ConnectionError("connection refused")
            super()._put(key, path)

    store = Flaky(tmp_path / "store", retries=3, backoff=0.05)
    src, data = _payload(tmp_path, 1000)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.s3"):
        sha, _ = store.put_file("k/v.bin", src)
    elapsed = time.monotonic() - t0
    assert Flaky.calls == 3 and sha == hashlib.sha256(data).hexdigest()
    assert elapsed >= 0.05 + 0.10 - 0.01  # backoff 1x then 2x
    assert sum("retrying" in r.message for r in caplog.records) == 2


def test_s3_down_raises_storage_error_after_retries(tmp_path: Path) -> None:
    store = open_store("s3://nobucket/x", s3_endpoint=f"127.0.0.1:{_free_port()}", s3_access_key="a",
                       s3_secret_key="b", retries=2, backoff=0.02, timeout=2.0)
    src, _ = _payload(tmp_path, 100)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.put_file("k.bin", src)
    assert time.monotonic() - t0 < 10  # bounded: urllib3's own retries are off
    with pytest.raises(StorageError):
        store.ping()


def test_s3_roundtrip_and_presign(s3_store: S3Store, tmp_path: Path) -> None:
    src, data = _payload(tmp_path)
    key = "jobs/job-9/checkpoints/helip_step10.pt"
    sha, size = s3_store.put_file(key, src)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert s3_store.exists(key) and not s3_store.exists("jobs/job-9/other")
    assert s3_store.get_file(key, tmp_path / "back.pt").read_bytes() == data
    # the prefix of the storage URL is part of the object name
    assert s3_store.client.stat_object(s3_store.bucket, "pre/fix/" + key).size == len(data)
    url = s3_store.presigned_get(key, 60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == data
    s3_store.ping()
    s3_store.put_bytes("jobs/job-9/metrics.json", b"{}")
    assert s3_store.delete_prefix("jobs/job-9/") == 2
    assert not s3_store.exists(key)
    with pytest.raises(StorageError, match="no object"):
        s3_store.get_file(key, tmp_path / "gone.pt")


def test_s3_expired_presigned_url_is_refused(s3_store: S3Store) -> None:
    s3_store.put_bytes("short.txt", b"hello")
    url = s3_store.presigned_get("short.txt", 1)
    time.sleep(2.2)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url, timeout=10)
    assert exc.value.code in (400, 403)


def test_s3_wrong_secret_is_a_storage_error(s3, tmp_path: Path) -> None:
    bucket = "helip-auth-" + uuid.uuid4().hex[:8]
    s3.make_bucket(bucket)
    store = open_store(f"s3://{bucket}", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                       s3_secret_key="wrong-secret", retries=0)
    with pytest.raises(StorageError):
        store.put_bytes("x.txt", b"x")


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_list_and_delete_single_objects(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = request.getfixturevalue("s3_store") if kind == "s3" else FileStore(tmp_path / "store")
    for key in ("jobs/a/x.pt", "jobs/a/states/1/state.pt", "jobs/b/y.pt"):
        store.put_bytes(key, b"1")
    assert store.list_keys("jobs/a/") == ["jobs/a/states/1/state.pt", "jobs/a/x.pt"]
    assert set(store.list_keys("")) >= {"jobs/a/x.pt", "jobs/b/y.pt"}
    assert store.delete("jobs/a/x.pt") is True and store.delete("jobs/a/x.pt") is False
    assert store.list_keys("jobs/a/") == ["jobs/a/states/1/state.pt"]
    with pytest.raises(StorageError):
        store.list_keys("../")
