"""util/storage.py: local paths and fsspec URLs through one set of functions, against a real S3 API (moto)."""

import os

import pytest

from illust2vec.errors import UserError
from illust2vec.util import storage
from s3server import CuttingProxy, forget_filesystems, start_s3


def test_local_paths_and_file_urls_round_trip(tmp_path):
    for root in (tmp_path / "a", f"file://{tmp_path}/b"):
        storage.makedirs(root)
        storage.write_text(storage.join(root, "x.txt"), "hello")
        storage.write_bytes(storage.join(root, "y.bin"), b"\x00\x01")
        assert storage.read_text(storage.join(root, "x.txt")) == "hello"
        assert storage.size(storage.join(root, "y.bin")) == 2
        assert [storage.name(p) for p in storage.listing(root, "*.txt")] == ["x.txt"]
        storage.remove(storage.join(root, "x.txt"))
        assert not storage.exists(storage.join(root, "x.txt"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_s3_round_trip_listing_and_upload(bucket, tmp_path):
    root = f"{bucket}/data"
    storage.write_bytes(storage.join(root, "b.tar"), b"b" * 10)
    (tmp_path / "a.tar").write_bytes(b"a" * 7)
    storage.upload(tmp_path / "a.tar", storage.join(root, "a.tar"))
    storage.write_text(storage.join(root, "notes.txt"), "n")
    storage.write_text(storage.join(root, "sub", "deep.txt"), "d")
    assert storage.listing(root, "*.tar") == [f"{root}/a.tar", f"{root}/b.tar"]
    assert storage.walk_files(root)[-1] == f"{root}/sub/deep.txt"
    assert storage.size(f"{root}/a.tar") == 7
    assert storage.read_bytes(f"{root}/b.tar") == b"b" * 10
    with storage.local_copy(f"{root}/a.tar") as p:
        assert p.read_bytes() == b"a" * 7
    assert not p.exists()
    storage.remove(f"{root}/a.tar")
    assert storage.listing(root, "*.tar") == [f"{root}/b.tar"]
    assert storage.listing(f"{bucket}/nothing-here") == []


def test_staged_dir_uploads_on_success_marker_last_and_nothing_on_failure(bucket, tmp_path, monkeypatch):
    order = []
    real_upload = storage.upload

    def recording(src, loc):
        order.append(storage.name(loc))
        real_upload(src, loc)

    monkeypatch.setattr(storage, "upload", recording)
    with storage.staged_dir(f"{bucket}/out", last=("dataset.json",)) as d:
        (d / "dataset.json").write_text("{}")
        (d / "train-000000.tar").write_bytes(b"t")
        (d / "val-000000.tar").write_bytes(b"v")
    assert order == ["train-000000.tar", "val-000000.tar", "dataset.json"]
    with pytest.raises(RuntimeError), storage.staged_dir(f"{bucket}/failed") as d:
        (d / "dataset.json").write_text("{}")
        raise RuntimeError("stage failed")
    assert storage.listing(f"{bucket}/failed") == []


def test_bad_locations_are_one_line_naming_the_url(bucket):
    with pytest.raises(UserError, match=r"^foo://x/y: no filesystem knows foo:// URLs$"):
        storage.location("foo://x/y")
    with pytest.raises(UserError, match="can be read but not written"):
        storage.location("https://example.org/out", "--out", write=True)
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-here/x: cannot open: no such bucket$"):
        storage.read_bytes("s3://no-such-bucket-here/x")
    with pytest.raises(UserError, match="cannot write: no such bucket"):
        storage.check_writable_root("s3://no-such-bucket-here/out")
    with pytest.raises(UserError, match=f"^{bucket}/missing.txt: cannot open: not found$"):
        storage.read_bytes(f"{bucket}/missing.txt")
    assert storage.display("s3://AKIA:hunter2@bkt/x?X-Amz-Signature=abc") == "s3://bkt/x"
    assert storage.location("file:///tmp/x") == storage.local_path("/tmp/x")


@pytest.fixture
def env_restored():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    forget_filesystems()


def test_wrong_missing_credentials_and_no_server_never_show_the_secret(env_restored):
    import boto3

    # moto checks signatures once its first N requests (creating the user, its key and its policy) are done
    with start_s3({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        anyone = {"aws_access_key_id": "x", "aws_secret_access_key": "y", "region_name": "us-east-1"}
        iam = boto3.client("iam", endpoint_url=server.endpoint, **anyone)
        iam.create_user(UserName="u")
        key = iam.create_access_key(UserName="u")["AccessKey"]
        policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'
        iam.put_user_policy(UserName="u", PolicyName="all", PolicyDocument=policy)
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=key["AccessKeyId"])
        os.environ["AWS_SECRET_ACCESS_KEY"] = key["SecretAccessKey"]
        forget_filesystems()
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="private")
        storage.write_text("s3://private/a.txt", "a")  # the right key works
        os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-value-123"
        forget_filesystems()
        with pytest.raises(UserError) as e:
            storage.read_bytes("s3://private/a.txt")
        denied = "access denied: the credentials are wrong or lack permission"
        assert str(e.value) == f"s3://private/a.txt: cannot open: {denied}"
        assert "wrong-secret" not in str(e.value)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(name)
        os.environ.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
        forget_filesystems()
        with pytest.raises(UserError, match="no credentials found"):
            storage.read_bytes("s3://private/a.txt")
    os.environ.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL=server.endpoint)
    forget_filesystems()  # the server has stopped: nothing listens on its port any more
    with pytest.raises(UserError, match="could not reach the store"):
        storage.read_bytes("s3://private/a.txt")


def test_a_read_survives_a_connection_cut_mid_body(s3_server, bucket, env_restored):
    data = os.urandom(3_000_000)
    storage.write_bytes(f"{bucket}/big.bin", data)
    proxy = CuttingProxy(s3_server.endpoint, after=200_000, cut_responses=12)
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    forget_filesystems()
    try:
        with storage.open_read(f"{bucket}/big.bin") as f:
            got = b"".join(iter(lambda: f.read(100_000), b""))
    finally:
        proxy.close()
    assert proxy.cuts == 12
    assert got == data


def test_an_upload_whose_connection_keeps_dropping_fails_in_one_line_and_leaves_no_object(
    s3_server, bucket, tmp_path, env_restored
):
    src = tmp_path / "part.tar"
    src.write_bytes(os.urandom(1_000_000))
    proxy = CuttingProxy(s3_server.endpoint, after=100_000, cut_requests=1000)
    os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="2", AWS_RETRY_MODE="standard")
    forget_filesystems()
    try:
        with pytest.raises(UserError, match=f"^{bucket}/part.tar: upload failed: could not reach the store"):
            storage.upload(src, f"{bucket}/part.tar")
    finally:
        proxy.close()
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint
    forget_filesystems()
    assert not storage.exists(f"{bucket}/part.tar")
    storage.upload(src, f"{bucket}/part.tar")  # the rerun
    assert storage.read_bytes(f"{bucket}/part.tar") == src.read_bytes()


def test_a_lost_connection_whose_message_holds_403_is_not_access_denied():
    from illust2vec.util.storage import _describe

    lost = _describe(OSError("Connection broken: IncompleteRead(403112 bytes read, 1234 more expected)"))
    assert lost.startswith("could not reach the store"), lost
    assert _describe(OSError("An error occurred (403) when calling the PutObject operation: Forbidden")).startswith(
        "access denied"
    )
