//! The server's JSON logs, from the real binaries: one object a line, an
//! upload, a snapshot and a refusal each logged with the client's id, and
//! no file name at the default level.

mod support;

use std::time::Duration;

use support::processes::{run_client, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

/// The log lines whose message is `message`.
fn events<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["message"].as_str() == Some(message))
        .collect()
}

/// The `client_id` of the line's connection span.
fn client_id(line: &serde_json::Value) -> Option<&str> {
    line["spans"]
        .as_array()?
        .iter()
        .find_map(|s| s["client_id"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_client_of_each_event_and_no_file_at_info_level() {
    let server = ServerProcess::start_logging(&["--log-format", "json", "--append-only"], "info");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let addr = server.addr.to_string();
    let client = |args: &'static [&'static str]| {
        let config = config.clone();
        let addr = addr.clone();
        async move {
            let mut all = vec!["--server", addr.as_str(), "--json"];
            all.extend_from_slice(args);
            run_client(&config, &all, LIMIT).await
        }
    };
    let out = client(&["register", "--name", "logs"]).await;
    assert!(out.status.success(), "register: {}", stderr(&out));
    let registered: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = registered["client_id"].as_str().unwrap().to_owned();

    let file = dir.path().join("zebra-per-file-name.txt");
    write_file(&file, 5000, 1);
    let folder = dir.path().join("okapi-folder");
    write_file(&folder.join("okapi-inner-name.bin"), 7000, 2);
    let (file, folder) = (file.display().to_string(), folder.display().to_string());
    let mut args = vec!["--server", addr.as_str(), "--per-file", "backup", &file];
    let out = run_client(&config, &args, LIMIT).await;
    assert!(out.status.success(), "per-file backup: {}", stderr(&out));
    args = vec!["--server", addr.as_str(), "backup", &folder];
    let out = run_client(&config, &args, LIMIT).await;
    assert!(out.status.success(), "snapshot: {}", stderr(&out));
    let out = client(&["delete", "zebra-per-file-name.txt"]).await;
    assert_eq!(out.status.code(), Some(4), "append-only: {}", stderr(&out));

    // The server writes each line as the event happens; give the last one
    // a moment.
    let mut log = String::new();
    for _ in 0..50 {
        log = server.log();
        if log.contains("delete refused") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for message in [
        "upload committed",
        "snapshot committed",
        "delete refused: append-only",
    ] {
        let found = events(&lines, message);
        assert_eq!(found.len(), 1, "{message}: {log}");
        assert_eq!(client_id(found[0]), Some(id.as_str()), "{message}: {log}");
        assert_eq!(found[0]["level"], "INFO", "{message}");
    }
    for name in ["zebra", "okapi"] {
        assert!(
            !log.contains(name),
            "a file name ({name}) in the log: {log}"
        );
    }
}
