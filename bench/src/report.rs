//! The results: one row per measurement, printed as a table and written as
//! JSON or CSV.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// MB/s is decimal: 10^6 bytes per second.
pub const MB: f64 = 1e6;
pub const MIB: f64 = 1024.0 * 1024.0;

/// One measurement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// "large", "small", "concurrent" or "limit".
    pub scenario: String,
    /// "ours/legacy", "scp", "rsync", "borg", "restic", or the limit's name.
    pub tool: String,
    /// "backup", "restore", or what a limit measures.
    pub op: String,
    pub bytes: u64,
    pub files: u64,
    pub wall_s: f64,
    pub mb_s: f64,
    pub files_s: Option<f64>,
    pub client_cpu_s: Option<f64>,
    pub client_rss_mib: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub server_rss_mib: Option<f64>,
    /// Concurrent clients: the median and 99th percentile time per client.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    /// Our MB/s over the lower physical limit (large file rows).
    pub of_limit: Option<f64>,
    /// This tool's wall time over ours for the same work (> 1: ours is
    /// faster).
    pub vs_ours: Option<f64>,
    /// What the tool itself says it sent (ours: `sent_bytes` of
    /// `backup --json`, the sealed objects the server lacked).
    pub sent_bytes: Option<u64>,
    /// Bytes counted on the wire by the relay: tool to server, and back.
    pub wire_up: Option<u64>,
    pub wire_down: Option<u64>,
    /// What the operation added to the server's data directory or the
    /// repository.
    pub stored_bytes: Option<u64>,
    pub note: String,
}

/// The operations of a data set, as the `op` column names them.
pub const OP_BACKUP: &str = "backup";
pub const OP_RESTORE: &str = "restore";
/// A second backup of unchanged data.
pub const OP_RERUN: &str = "re-run";
/// A backup after 1 MiB was overwritten in the middle of the large file.
pub const OP_CHANGED: &str = "1 MiB changed";
/// A backup of the large file under two names, on a fresh server.
pub const OP_TWO_NAMES: &str = "2 names";

impl Row {
    pub fn new(scenario: &str, tool: &str, op: &str, bytes: u64, files: u64, wall_s: f64) -> Self {
        let per_s = |x: f64| if wall_s > 0.0 { x / wall_s } else { 0.0 };
        Self {
            scenario: scenario.into(),
            tool: tool.into(),
            op: op.into(),
            bytes,
            files,
            wall_s,
            mb_s: per_s(bytes as f64 / MB),
            files_s: (files > 1).then(|| per_s(files as f64)),
            ..Self::default()
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub command: String,
    pub rows: Vec<Row>,
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub load_before: String,
    pub load_after: String,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else if b >= MIB {
        format!("{:.0} MiB", b / MIB)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// Columns of the main table.
const COLUMNS: usize = 19;

const HEADER: [&str; COLUMNS] = [
    "scenario",
    "tool",
    "op",
    "size",
    "files",
    "wall s",
    "MB/s",
    "files/s",
    "cli CPU s",
    "cli RSS MiB",
    "srv CPU s",
    "srv RSS MiB",
    "p50 s",
    "p99 s",
    "of limit",
    "tool/ours",
    "sent",
    "wire up / down",
    "stored",
];

/// A byte count short enough for a cell: KiB below 1 MiB, else MiB with
/// one decimal; "-" when unknown.
fn amount(bytes: Option<u64>) -> String {
    match bytes {
        None => "-".into(),
        Some(b) if (b as f64) < MIB => format!("{:.0} KiB", b as f64 / 1024.0),
        Some(b) => format!("{:.1} MiB", b as f64 / MIB),
    }
}

fn wire(r: &Row) -> String {
    match (r.wire_up, r.wire_down) {
        (Some(_), Some(_)) => format!("{} / {}", amount(r.wire_up), amount(r.wire_down)),
        _ => "-".into(),
    }
}

fn cells(r: &Row) -> [String; COLUMNS] {
    [
        r.scenario.clone(),
        r.tool.clone(),
        r.op.clone(),
        size(r.bytes),
        r.files.to_string(),
        format!("{:.2}", r.wall_s),
        format!("{:.0}", r.mb_s),
        opt(r.files_s, 0),
        opt(r.client_cpu_s, 2),
        opt(r.client_rss_mib, 1),
        opt(r.server_cpu_s, 2),
        opt(r.server_rss_mib, 1),
        opt(r.p50_s, 2),
        opt(r.p99_s, 2),
        opt(r.of_limit, 2),
        opt(r.vs_ours, 2),
        amount(r.sent_bytes),
        wire(r),
        amount(r.stored_bytes),
    ]
}

/// Columns of the summary: one line per tool.
const SUMMARY: [&str; 10] = [
    "tool",
    "large backup s",
    "large restore s",
    "large re-run s",
    "1 MiB changed s",
    "sent / wire up",
    "small backup s",
    "small restore s",
    "small re-run s",
    "peak RSS cli / srv MiB",
];

/// Columns of the prune summary: one line per tool.
const PRUNE_SUMMARY: [&str; 9] = [
    "tool",
    "backups s (sum)",
    "forget s",
    "prune s",
    "prune CPU s",
    "prune peak RSS MiB",
    "repository before",
    "after",
    "reclaimed",
];

impl Report {
    /// A Markdown table (readable as plain text too), notes below it.
    pub fn table(&self) -> String {
        let rows: Vec<[String; COLUMNS]> = self.rows.iter().map(cells).collect();
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", HEADER.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            HEADER
                .iter()
                .enumerate()
                .map(|(i, _)| if i < 3 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .filter(|r| !r.note.is_empty())
            .map(|r| format!("- {} {} {}: {}", r.scenario, r.tool, r.op, r.note))
            .collect();
        if !notes.is_empty() {
            out.push('\n');
            for n in notes {
                let _ = writeln!(out, "{n}");
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "- skipped: {s}");
        }
        out
    }

    /// One line per tool (ours in each mode, then the others) with the
    /// wall times of each operation side by side; peak RSS is the largest
    /// of the tool's large and small rows (not the concurrent one).
    pub fn summary(&self) -> String {
        let mut tools: Vec<&str> = Vec::new();
        for r in &self.rows {
            let single = r.scenario == "large" || r.scenario == "small";
            if single && !r.tool.contains(" procs") && !tools.contains(&r.tool.as_str()) {
                tools.push(&r.tool);
            }
        }
        let find = |tool: &str, scenario: &str, op: &str| {
            self.rows
                .iter()
                .find(|r| r.tool == tool && r.scenario == scenario && r.op == op)
        };
        let wall = |tool: &str, scenario: &str, op: &str| {
            opt(find(tool, scenario, op).map(|r| r.wall_s), 2)
        };
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", SUMMARY.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(SUMMARY.len() - 1));
        for tool in tools {
            let changed = find(tool, "large", OP_CHANGED);
            let sent = changed.map_or_else(
                || "-".into(),
                |r| format!("{} / {}", amount(r.sent_bytes), amount(r.wire_up)),
            );
            let mine = || {
                self.rows
                    .iter()
                    .filter(|r| r.tool == tool && (r.scenario == "large" || r.scenario == "small"))
            };
            let peak = |f: fn(&Row) -> Option<f64>| opt(mine().filter_map(f).reduce(f64::max), 0);
            let line = [
                tool.to_owned(),
                wall(tool, "large", OP_BACKUP),
                wall(tool, "large", OP_RESTORE),
                wall(tool, "large", OP_RERUN),
                wall(tool, "large", OP_CHANGED),
                sent,
                wall(tool, "small", OP_BACKUP),
                wall(tool, "small", OP_RESTORE),
                wall(tool, "small", OP_RERUN),
                format!(
                    "{} / {}",
                    peak(|r| r.client_rss_mib),
                    peak(|r| r.server_rss_mib)
                ),
            ];
            let _ = writeln!(out, "| {} |", line.join(" | "));
        }
        out
    }

    /// The prune scenario side by side, one line per tool: the history's
    /// backups, the forget, the prune (its seconds, CPU and peak RSS), and
    /// the repository before and after; `None` when it did not run.
    pub fn prune_summary(&self) -> Option<String> {
        let mut tools: Vec<&str> = Vec::new();
        for r in self.rows.iter().filter(|r| r.scenario == "prune") {
            if !tools.contains(&r.tool.as_str()) {
                tools.push(&r.tool);
            }
        }
        if tools.is_empty() {
            return None;
        }
        let find = |tool: &str, op: &str| {
            self.rows
                .iter()
                .find(|r| r.scenario == "prune" && r.tool == tool && r.op.starts_with(op))
        };
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", PRUNE_SUMMARY.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(PRUNE_SUMMARY.len() - 1));
        for tool in tools {
            let backups = find(tool, "backup");
            let forget = find(tool, "forget");
            let prune = find(tool, "prune");
            let reclaimed = prune.and_then(|p| {
                let after = p.stored_bytes?;
                Some(format!(
                    "{:.1} %",
                    p.bytes.saturating_sub(after) as f64 * 100.0 / p.bytes.max(1) as f64
                ))
            });
            let line = [
                tool.to_owned(),
                opt(backups.map(|r| r.wall_s), 1),
                opt(forget.map(|r| r.wall_s), 2),
                opt(prune.map(|r| r.wall_s), 2),
                opt(prune.and_then(|r| r.client_cpu_s), 2),
                opt(prune.and_then(|r| r.client_rss_mib), 1),
                amount(prune.map(|r| r.bytes)),
                amount(prune.and_then(|r| r.stored_bytes)),
                reclaimed.unwrap_or_else(|| "-".into()),
            ];
            let _ = writeln!(out, "| {} |", line.join(" | "));
        }
        Some(out)
    }

    /// The rows as CSV, with a header line.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "scenario,tool,op,bytes,files,wall_s,mb_s,files_s,client_cpu_s,client_rss_mib,\
             server_cpu_s,server_rss_mib,p50_s,p99_s,of_limit,vs_ours,sent_bytes,wire_up,\
             wire_down,stored_bytes,note\n",
        );
        let o = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
        let n = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{:.4},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.scenario),
                csv_field(&r.tool),
                csv_field(&r.op),
                r.bytes,
                r.files,
                r.wall_s,
                r.mb_s,
                o(r.files_s),
                o(r.client_cpu_s),
                o(r.client_rss_mib),
                o(r.server_cpu_s),
                o(r.server_rss_mib),
                o(r.p50_s),
                o(r.p99_s),
                o(r.of_limit),
                o(r.vs_ours),
                n(r.sent_bytes),
                n(r.wire_up),
                n(r.wire_down),
                n(r.stored_bytes),
                csv_field(&r.note)
            );
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut r = Row::new("large", "ours/legacy", "backup", 1 << 30, 1, 2.0);
        r.note = "a, \"quoted\" note".into();
        r.of_limit = Some(0.9);
        Report {
            date: "d".into(),
            machine: Machine {
                cpu_model: "c".into(),
                cpus: 2,
                kernel: "k".into(),
                load_before: String::new(),
                load_after: String::new(),
            },
            command: "backup-bench".into(),
            rows: vec![r, Row::new("small", "rsync", "backup", 4096 * 10, 10, 0.5)],
            skipped: vec!["borg: not installed".into()],
        }
    }

    #[test]
    fn rates_come_from_bytes_files_and_time() {
        let r = Row::new("small", "x", "backup", 40_000_000, 10_000, 4.0);
        assert_eq!(r.mb_s, 10.0);
        assert_eq!(r.files_s, Some(2500.0));
        assert_eq!(Row::new("large", "x", "backup", 5, 1, 1.0).files_s, None);
    }

    #[test]
    fn csv_quotes_fields_and_has_one_line_per_row() {
        let csv = report().csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("large,ours/legacy,backup,1073741824,1,2.0000,536.87,"));
        assert!(lines[1].ends_with(",\"a, \"\"quoted\"\" note\""));
        assert_eq!(
            lines[0].split(',').count(),
            lines[2].split(',').count(),
            "{csv}"
        );
    }

    #[test]
    fn summary_puts_each_tools_operations_on_one_line() {
        let mut rows = vec![
            Row::new("large", "ours/snapshot", OP_BACKUP, 1 << 30, 1, 2.0),
            Row::new("large", "ours/snapshot", OP_RERUN, 1 << 30, 1, 0.5),
            Row::new("small", "ours/snapshot 4 procs", OP_BACKUP, 1, 10, 9.0),
            Row::new("large", "rsync", OP_BACKUP, 1 << 30, 1, 3.0),
        ];
        let mut changed = Row::new("large", "ours/snapshot", OP_CHANGED, 1 << 30, 1, 0.7);
        changed.sent_bytes = Some(2 << 20);
        changed.wire_up = Some(3 << 20);
        changed.client_rss_mib = Some(20.0);
        changed.server_rss_mib = Some(30.0);
        rows.push(changed);
        let r = Report { rows, ..report() };
        let s = r.summary();
        assert_eq!(s.lines().count(), 4, "{s}");
        assert!(
            s.contains(
                "| ours/snapshot | 2.00 | - | 0.50 | 0.70 | 2.0 MiB / 3.0 MiB | - | - | - | 20 / 30 |"
            ),
            "{s}"
        );
        assert!(s.contains("| rsync | 3.00 | - | - | - | - |"), "{s}");
        assert_eq!(amount(Some(12 * 1024)), "12 KiB");
        assert_eq!(amount(None), "-");
        assert!(!s.contains("procs"));
    }

    #[test]
    fn prune_summary_puts_each_tools_prune_on_one_line() {
        assert!(report().prune_summary().is_none());
        let mut prune = Row::new("prune", "restic", "prune", 200 << 20, 1, 4.0);
        prune.stored_bytes = Some(150 << 20);
        prune.client_rss_mib = Some(90.0);
        prune.client_cpu_s = Some(3.0);
        let rows = vec![
            Row::new("prune", "restic", "backup ×100", 64 << 20, 1000, 120.0),
            Row::new("prune", "restic", "forget", 200 << 20, 1, 0.5),
            prune,
        ];
        let s = Report { rows, ..report() }.prune_summary().unwrap();
        assert_eq!(s.lines().count(), 3, "{s}");
        assert!(
            s.contains(
                "| restic | 120.0 | 0.50 | 4.00 | 3.00 | 90.0 | 200.0 MiB | 150.0 MiB | 25.0 % |"
            ),
            "{s}"
        );
    }

    #[test]
    fn table_has_a_line_per_row_and_the_notes() {
        let t = report().table();
        assert!(t.contains("| large | ours/legacy | backup | 1.00 GiB | 1 | 2.00 | 537 |"));
        assert!(t.contains("| 0.90 |"));
        assert!(t.contains("- skipped: borg: not installed"));
    }
}
