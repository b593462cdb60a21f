from tests.support.moto import boto_client
from tests.support.servers import RedisServer


def test_redis_fixture_starts_a_real_server(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        assert c.set("k", "v")
        assert c.get("k") == b"v"


def test_moto_fixture_serves_a_bucket(s3_bucket: str, moto_endpoint: str) -> None:
    s3 = boto_client(moto_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="a", Body=b"1")
    assert s3.get_object(Bucket=s3_bucket, Key="a")["Body"].read() == b"1"
