//! The throwaway cluster starts, makes databases, and survives a restart.

use backup_test_support::Postgres;

#[test]
fn a_throwaway_cluster_accepts_connections_and_restarts_on_its_port() {
    let Some(pg) = Postgres::start("a_throwaway_cluster_accepts_connections") else {
        return;
    };
    let url = pg.database();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    let other = pg.database();
    assert_ne!(url, other, "each database is new");
    let port = pg.port();
    pg.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.restart();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}
