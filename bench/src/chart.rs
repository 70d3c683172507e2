//! SVG charts of a report (`--plot DIR`): grouped bars, one group per
//! scenario and operation, one bar per tool. Drawn with `plotters`' SVG
//! backend alone: text goes out as `<text>` elements for the viewer to
//! set, so no font library is needed (plotters estimates text widths).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::report::{Report, Row, OP_BACKUP, OP_RESTORE};

/// One chart: groups along the x axis, a bar per series in each group.
#[derive(Debug, Clone, PartialEq)]
pub struct Bars {
    pub title: String,
    /// What the y axis counts.
    pub unit: String,
    /// Group labels, left to right.
    pub groups: Vec<String>,
    /// Series (tools), in legend order.
    pub series: Vec<String>,
    /// `values[series][group]`; `None`: the tool has no such row.
    pub values: Vec<Vec<Option<f64>>>,
    /// Each series' colour: its tool's place in the report (the same in
    /// every chart), lighter for a suffixed series (our server).
    pub colors: Vec<(usize, bool)>,
}

/// A value read from a row, and the suffix its series gets (" server" for
/// the server's side of ours).
type Metric = (&'static str, fn(&Row) -> Option<f64>);

impl Bars {
    /// The rows `keep` selects, grouped by scenario and operation (in the
    /// order they first appear), one series per tool and metric.
    fn collect(
        title: &str,
        unit: &str,
        tools: &[&str],
        rows: &[Row],
        keep: impl Fn(&Row) -> bool,
        metrics: &[Metric],
    ) -> Self {
        let mut groups: Vec<String> = Vec::new();
        let mut series: Vec<String> = Vec::new();
        let mut points: Vec<(String, String, f64)> = Vec::new();
        for r in rows.iter().filter(|r| keep(r)) {
            let group = format!("{} {}", r.scenario, r.op);
            for (suffix, metric) in metrics {
                let Some(v) = metric(r) else { continue };
                let name = format!("{}{suffix}", r.tool);
                if !groups.contains(&group) {
                    groups.push(group.clone());
                }
                if !series.contains(&name) {
                    series.push(name.clone());
                }
                points.push((name, group.clone(), v));
            }
        }
        let mut values = vec![vec![None; groups.len()]; series.len()];
        for (name, group, v) in points {
            let s = series.iter().position(|x| *x == name);
            let g = groups.iter().position(|x| *x == group);
            if let (Some(s), Some(g)) = (s, g) {
                if let Some(cell) = values.get_mut(s).and_then(|row| row.get_mut(g)) {
                    *cell = Some(v);
                }
            }
        }
        let colors = series
            .iter()
            .map(|name| {
                let place = |t: &&str| {
                    t == name
                        || name
                            .strip_prefix(*t)
                            .is_some_and(|rest| rest.starts_with(' '))
                };
                let i = tools.iter().position(place).unwrap_or(tools.len());
                (i, !tools.contains(&name.as_str()))
            })
            .collect();
        Self {
            title: title.into(),
            unit: unit.into(),
            groups,
            series,
            values,
            colors,
        }
    }

    fn is_empty(&self) -> bool {
        self.values.iter().flatten().all(Option::is_none)
    }

    /// The chart as an SVG document.
    ///
    /// # Errors
    /// When plotters fails to lay it out.
    pub fn svg(&self) -> Result<String> {
        let mut out = String::new();
        let groups = self.groups.len().max(1);
        let width = u32::try_from(300 + 170 * groups).unwrap_or(4000).min(4000);
        let height = 520;
        {
            let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_error)?;
            let top = self
                .values
                .iter()
                .flatten()
                .flatten()
                .copied()
                .fold(0.0_f64, f64::max);
            // Headroom over the tallest bar for its value and the legend.
            let top = if top > 0.0 { top * 1.4 } else { 1.0 };
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 20))
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..groups as f64, 0.0..top)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc(self.unit.as_str())
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()
                .map_err(plot_error)?;
            let n = self.series.len().max(1) as f64;
            let bar = 0.8 / n;
            for (s, name) in self.series.iter().enumerate() {
                let (place, light) = self.colors.get(s).copied().unwrap_or((s, false));
                let color = if light {
                    Palette99::pick(place).mix(0.45)
                } else {
                    Palette99::pick(place).to_rgba()
                };
                let row = self.values.get(s).cloned().unwrap_or_default();
                let bars = row.iter().enumerate().filter_map(|(g, v)| {
                    let v = (*v)?;
                    let x0 = g as f64 + 0.1 + s as f64 * bar;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + bar * 0.9, v)],
                        color.filled(),
                    ))
                });
                chart
                    .draw_series(bars)
                    .map_err(plot_error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
                // The value over each bar.
                let labels = row.iter().enumerate().filter_map(|(g, v)| {
                    let v = (*v)?;
                    let x = g as f64 + 0.1 + (s as f64 + 0.1) * bar;
                    Some(Text::new(
                        short(v),
                        (x, v + top * 0.01),
                        ("sans-serif", 10).into_font().color(&BLACK),
                    ))
                });
                chart.draw_series(labels).map_err(plot_error)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .margin(8)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.9))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(plot_error)?;
            // Group names under the axis, centred on each group.
            for (g, name) in self.groups.iter().enumerate() {
                let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
                let w = i32::try_from(name.len()).unwrap_or(0) * 4;
                root.draw(&Text::new(
                    name.clone(),
                    (x - w, y + 10),
                    ("sans-serif", 14).into_font().color(&BLACK),
                ))
                .map_err(plot_error)?;
            }
            root.present().map_err(plot_error)?;
        }
        Ok(out)
    }
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// A bar's value, short: no decimals from 100 up.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn first_run(r: &Row) -> bool {
    (r.scenario == "large" || r.scenario == "small")
        && (r.op == OP_BACKUP || r.op == OP_RESTORE)
        && !r.tool.contains(" procs")
}

fn prune_op(r: &Row) -> bool {
    r.scenario == "prune" && !r.op.starts_with("backup")
}

/// The charts a report makes, by file name: throughput and peak RSS of
/// each tool's first backup and restore per scenario, and, when the prune
/// scenario ran, the seconds and peak RSS of forget and prune (the
/// history's backups stay in the table).
pub fn charts(report: &Report) -> Vec<(&'static str, Bars)> {
    let rows = &report.rows;
    let mut tools: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.scenario != "limit") {
        if !tools.contains(&r.tool.as_str()) {
            tools.push(&r.tool);
        }
    }
    let client_rss: Metric = ("", |r| r.client_rss_mib);
    let server_rss: Metric = (" server", |r| r.server_rss_mib);
    let all = [
        (
            "throughput.svg",
            Bars::collect(
                "Throughput: first backup and restore (MB/s, higher is better)",
                "MB/s",
                &tools,
                rows,
                first_run,
                &[("", |r| Some(r.mb_s))],
            ),
        ),
        (
            "peak-rss.svg",
            Bars::collect(
                "Peak RSS: first backup and restore (MiB, lower is better)",
                "MiB",
                &tools,
                rows,
                first_run,
                &[client_rss, server_rss],
            ),
        ),
        (
            "prune-seconds.svg",
            Bars::collect(
                "Prune: wall seconds (lower is better)",
                "seconds",
                &tools,
                rows,
                prune_op,
                &[("", |r| Some(r.wall_s))],
            ),
        ),
        (
            "prune-rss.svg",
            Bars::collect(
                "Prune: peak RSS (MiB, lower is better)",
                "MiB",
                &tools,
                rows,
                prune_op,
                &[client_rss],
            ),
        ),
    ];
    all.into_iter().filter(|(_, b)| !b.is_empty()).collect()
}

/// Writes every chart of `report` into `dir`; returns their paths.
///
/// # Errors
/// When a chart cannot be drawn or written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, bars) in charts(report) {
        let path = dir.join(name);
        fs::write(&path, bars.svg()?).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Machine;

    fn report() -> Report {
        let mut rows = Vec::new();
        for (i, tool) in ["ours/snapshot", "restic", "borg"].iter().enumerate() {
            for (scenario, op) in [
                ("large", OP_BACKUP),
                ("large", OP_RESTORE),
                ("small", OP_BACKUP),
            ] {
                let mut r = Row::new(scenario, tool, op, 1 << 30, 1, 2.0 + i as f64);
                r.client_rss_mib = Some(40.0 + 10.0 * i as f64);
                if tool.starts_with("ours/") {
                    r.server_rss_mib = Some(21.0);
                }
                rows.push(r);
            }
        }
        rows.push(Row::new(
            "large",
            "ours/snapshot",
            "re-run",
            1 << 30,
            1,
            0.1,
        ));
        let mut prune = Row::new("prune", "restic", "prune", 1 << 27, 1, 3.5);
        prune.client_rss_mib = Some(80.0);
        rows.push(prune);
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
            rows,
            skipped: Vec::new(),
        }
    }

    /// Every opened element is closed, in order (a check of the SVG's
    /// nesting without an XML parser).
    fn well_formed(svg: &str) -> bool {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let Some(end) = rest[start..].find('>') else {
                return false;
            };
            let tag = &rest[start + 1..start + end];
            rest = &rest[start + end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                if open.pop() != Some(name.trim()) {
                    return false;
                }
            } else {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
        }
        open.is_empty()
    }

    #[test]
    fn groups_by_scenario_and_op_with_a_bar_per_tool() {
        let charts = charts(&report());
        let names: Vec<&str> = charts.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "throughput.svg",
                "peak-rss.svg",
                "prune-seconds.svg",
                "prune-rss.svg"
            ]
        );
        let throughput = &charts[0].1;
        assert_eq!(
            throughput.groups,
            ["large backup", "large restore", "small backup"]
        );
        assert_eq!(throughput.series, ["ours/snapshot", "restic", "borg"]);
        // restic's large backup: 1 GiB in 3 s.
        let restic = throughput.values[1][0].unwrap();
        assert!((restic - (1u64 << 30) as f64 / 1e6 / 3.0).abs() < 1e-9);
        let rss = &charts[1].1;
        assert_eq!(
            rss.series,
            ["ours/snapshot", "ours/snapshot server", "restic", "borg"]
        );
        assert_eq!(rss.values[1], [Some(21.0), Some(21.0), Some(21.0)]);
        // A tool keeps its colour from chart to chart; our server's bars
        // are a lighter shade of ours.
        assert_eq!(throughput.colors, [(0, false), (1, false), (2, false)]);
        assert_eq!(rss.colors, [(0, false), (0, true), (1, false), (2, false)]);
        assert_eq!(charts[2].1.colors, [(1, false)]);
    }

    #[test]
    fn renders_well_formed_svg_naming_every_tool() {
        let report = report();
        let dir = tempfile::tempdir().unwrap();
        let written = write(&report, dir.path()).unwrap();
        assert_eq!(written.len(), 4);
        for path in &written {
            let svg = fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", path.display());
            assert!(well_formed(&svg), "{}: {svg}", path.display());
            assert!(svg.matches("<rect").count() > 3, "{}", path.display());
        }
        let throughput = fs::read_to_string(&written[0]).unwrap();
        for text in [
            "ours/snapshot",
            "restic",
            "borg",
            "large backup",
            "small backup",
            "MB/s",
        ] {
            assert!(throughput.contains(text), "{text} missing");
        }
        let rss = fs::read_to_string(&written[1]).unwrap();
        assert!(rss.contains("ours/snapshot server"));
        assert!(fs::read_to_string(&written[2]).unwrap().contains("restic"));
        assert!(!well_formed("<svg><g></svg></g>"));
    }
}
