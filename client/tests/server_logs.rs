//! The server's JSON logs, from the real binaries: one object a line, an
//! upload, a snapshot and a refusal each logged with the client's id, and
//! no file name at the default level.

mod support;

use std::time::Duration;

use support::processes::{run_client, server_binary, stderr, ServerProcess};
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
    // A second version, for `prune` to remove.
    args = vec!["--server", addr.as_str(), "--per-file", "backup", &file];
    let out = run_client(&config, &args, LIMIT).await;
    assert!(out.status.success(), "per-file backup: {}", stderr(&out));

    // The server writes each line as the event happens; give the last one
    // a moment.
    let mut log = String::new();
    for _ in 0..50 {
        log = server.log();
        if log.matches("upload committed").count() == 2 {
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
    for (message, count) in [
        ("upload committed", 2),
        ("snapshot committed", 1),
        ("delete refused: append-only", 1),
    ] {
        let found = events(&lines, message);
        assert_eq!(found.len(), count, "{message}: {log}");
        for line in found {
            assert_eq!(client_id(line), Some(id.as_str()), "{message}: {log}");
            assert_eq!(line["level"], "INFO", "{message}");
        }
    }
    for name in ["zebra", "okapi"] {
        assert!(
            !log.contains(name),
            "a file name ({name}) in the log: {log}"
        );
    }

    // The operator's prune logs one line per client, with its id.
    let data = server.data.path().join("data");
    let out = std::process::Command::new(server_binary())
        .args([
            "prune",
            "--keep-last",
            "1",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "prune: {}", stderr(&out));
    let err = stderr(&out);
    let pruned: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["message"] == "pruned")
        .collect();
    assert_eq!(pruned.len(), 1, "{err}");
    assert_eq!(pruned[0]["client_id"], id.as_str(), "{err}");
    assert_eq!(pruned[0]["versions"], 1, "{err}");
    assert!(!err.contains("zebra"), "{err}");
}
