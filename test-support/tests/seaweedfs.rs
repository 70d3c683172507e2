//! SeaweedFS stops and comes back with its objects.

use backup_test_support::SeaweedFs;

#[test]
fn seaweedfs_stopped_refuses_connections_and_restarts_with_its_bucket() {
    let Some(mut weed) = SeaweedFs::start("seaweedfs_stopped_refuses_connections") else {
        return;
    };
    let port: u16 = weed
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the endpoint");
    assert!(weed.keys("").is_empty(), "a new bucket is empty");
    weed.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    weed.restart();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(weed.keys("").is_empty(), "the bucket answers again");
}
