"""The session's real servers: each fixture answers, enforces auth, and survives stop/start on the same port."""

from __future__ import annotations

import io
import os
import re
import socket

import pytest
import sqlalchemy as sa

from tests.services import (
    DB_PREFIX,
    SERVICE_FIXTURES,
    ExternalPostgres,
    ExternalRedis,
    ExternalS3,
    free_ports,
    make_minio,
    redis_ping,
)


def _db_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(sa.text("SELECT datname FROM pg_database")))
    finally:
        engine.dispose()


def test_env_is_single_threaded_and_offline():
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_plain_test_starts_no_server(request):
    # servers are lazy: nothing autouse may pull one in, or every unit test would pay for them
    assert not set(request.fixturenames) & (SERVICE_FIXTURES | {"services_dir"})


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(12)
    assert len(set(ports)) == 12
    for port in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# --- Postgres ------------------------------------------------------------------------------------


def test_pg_url_round_trip(pg_url):
    assert re.fullmatch(rf"postgresql\+psycopg://postgres@127\.0\.0\.1:\d+/{DB_PREFIX}[0-9a-f]{{12}}", pg_url) or (
        os.environ.get("HELIP_TEST_DATABASE_URL"))
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t_round (id int PRIMARY KEY, name text)"))
            conn.execute(sa.text("INSERT INTO t_round VALUES (1, 'dog'), (2, 'cat')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name FROM t_round ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [(1, "dog"), (2, "cat")]
            assert conn.scalar(sa.text("SELECT current_database()")) == pg_url.rsplit("/", 1)[1]
    finally:
        engine.dispose()


def test_make_pg_database_gives_fresh_isolated_databases(make_pg_database, pg_url):
    a, b = make_pg_database(), make_pg_database()
    assert len({a, b, pg_url}) == 3
    ea, eb = sa.create_engine(a), sa.create_engine(b)
    try:
        with ea.begin() as conn:
            conn.execute(sa.text("CREATE TABLE only_in_a (x int)"))
        with eb.connect() as conn:
            assert sa.inspect(conn).get_table_names() == []
        with ea.connect() as conn:
            assert sa.inspect(conn).get_table_names() == ["only_in_a"]
    finally:
        ea.dispose()
        eb.dispose()


def test_pg_drop_removes_only_what_it_created(pg_server):
    # a second admin on the same server: drop_databases must drop its own databases and nothing else
    server_url = pg_server.admin.url.set(database="postgres").render_as_string(hide_password=False)
    other = ExternalPostgres(server_url)
    mine = other.create_database()
    name = mine.rsplit("/", 1)[1]
    before = _db_names(server_url)
    assert name in before
    other.drop_databases()
    after = _db_names(server_url)
    assert after == before - {name}
    assert "postgres" in after


def test_pg_stop_start_keeps_port_and_data(pg_server, make_pg_database):
    url = make_pg_database()
    engine = sa.create_engine(url, pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE kept (v text)"))
            conn.execute(sa.text("INSERT INTO kept VALUES ('before stop')"))
        port = pg_server.port
        pg_server.stop()
        assert not pg_server.running
        with pytest.raises(sa.exc.OperationalError):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        pg_server.start()
        assert pg_server.port == port
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT v FROM kept")) == "before stop"
        pg_server.kill()  # crash: recovery on restart must still find committed rows
        pg_server.restart()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT v FROM kept")) == "before stop"
    finally:
        engine.dispose()


# --- Redis -----------------------------------------------------------------------------------------


def test_redis_ping_set_get(redis_url):
    import redis

    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", redis_url) or os.environ.get("HELIP_TEST_REDIS_URL")
    assert not redis_url.endswith(":6379/0")  # never the machine's own server
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        client.set("helip:test:key", b"value-1")
        assert client.get("helip:test:key") == b"value-1"
        client.delete("helip:test:key")
    finally:
        client.close()


def test_redis_stop_start_keeps_port(redis_server):
    import redis

    port = redis_server.port
    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=1)
    try:
        client.set("k", "v")
        redis_server.stop()
        assert not redis_ping("127.0.0.1", port)
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        redis_server.start()
        assert redis_server.port == port
        assert client.ping() is True
        assert client.get("k") is None  # no persistence: a restarted broker has forgotten everything
    finally:
        client.close()


def test_first_start_moves_off_a_port_someone_else_took(tmp_path):
    # free_ports() cannot reserve: another process may bind the port before the server does
    from tests.services import RedisServer

    server = RedisServer(tmp_path / "redis")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server.port = taken
        server.start()
        try:
            assert server.port != taken
            assert redis_ping("127.0.0.1", server.port)
        finally:
            server.kill()
    assert not redis_ping("127.0.0.1", server.port)


# --- S3 ---------------------------------------------------------------------------------------------


def test_s3_put_get_with_credentials(s3):
    assert s3.endpoint_url == f"http://{s3.endpoint}"
    bucket = s3.make_bucket("helip-svc-test")
    assert s3.make_bucket("helip-svc-test") == bucket  # idempotent
    client = s3.client()
    payload = os.urandom(300_000)
    client.put_object(bucket, "dir/blob.bin", io.BytesIO(payload), len(payload))
    resp = client.get_object(bucket, "dir/blob.bin")
    try:
        assert resp.read() == payload
    finally:
        resp.close()
        resp.release_conn()
    assert [o.object_name for o in client.list_objects(bucket, prefix="dir/")] == ["dir/blob.bin"]


def test_s3_refuses_wrong_or_missing_credentials(s3):
    from minio.error import S3Error

    bucket = s3.make_bucket("helip-svc-auth")
    s3.client().put_object(bucket, "secret.txt", io.BytesIO(b"x"), 1)
    with pytest.raises(S3Error) as wrong:
        s3.client(secret_key="not-the-secret").get_object(bucket, "secret.txt")
    assert wrong.value.code == "SignatureDoesNotMatch"
    anonymous = make_minio(s3.endpoint, None, None, secure=s3.endpoint_url.startswith("https"), timeout=10)
    with pytest.raises(S3Error) as anon:
        anonymous.get_object(bucket, "secret.txt")
    assert anon.value.code == "AccessDenied"


def test_s3_stop_start_keeps_port_and_objects(s3_server):
    from urllib3.exceptions import MaxRetryError

    bucket = s3_server.make_bucket("helip-svc-restart")
    s3_server.client().put_object(bucket, "kept.txt", io.BytesIO(b"kept"), 4)
    port = s3_server.port
    s3_server.stop()
    with pytest.raises(MaxRetryError):
        s3_server.client(timeout=2).bucket_exists(bucket)
    s3_server.start()
    assert s3_server.port == port
    resp = s3_server.client().get_object(bucket, "kept.txt")
    try:
        assert resp.read() == b"kept"
    finally:
        resp.close()
        resp.release_conn()


# --- the safety net and the HELIP_TEST_* mode --------------------------------------------------------


def test_fault_test_leaves_redis_stopped(redis_server):
    # deliberately leaves the server down; the next test checks the autouse fixture brought it back
    redis_server.stop()
    assert not redis_server.running


def test_stopped_server_is_back_for_the_next_test(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_external_servers_refuse_stop_start_by_skipping():
    s3 = ExternalS3("https://minio.example:9000", "ak", "sk")
    assert (s3.endpoint, s3.endpoint_url, s3.secure) == ("minio.example:9000", "https://minio.example:9000", True)
    assert ExternalS3("127.0.0.1:9000", "ak", "sk").endpoint_url == "http://127.0.0.1:9000"
    for server in (s3, ExternalRedis("redis://r:6379/0"), ExternalPostgres("postgresql://u:p@db:5432/postgres")):
        assert not server.controllable
        for hook in (server.stop, server.start, server.restart):
            with pytest.raises(pytest.skip.Exception, match="HELIP_TEST_"):
                hook()
