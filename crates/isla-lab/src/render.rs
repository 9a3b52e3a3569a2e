//! The report in three forms from the same rows: the seed's comparison table for the terminal,
//! `report.md`, and a self-contained `report.html` with the SVG plots inline.

use crate::model::{key, num, Figure, Isolation, Kind, Outcome, Results, Subject};
use crate::plot;
use crate::Result;

/// A table: header and rows of cells.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// A table cell: the figure's one-line text, a long reason cut short (the method list and
/// results.json keep it whole).
fn cell(f: Option<&Figure>) -> String {
    let text = f.map(Figure::brief).unwrap_or_else(|| "-".into());
    if text.chars().count() > 160 {
        text.chars().take(157).collect::<String>() + "..."
    } else {
        text
    }
}

/// How much a subject shares with the host, from its probes.
fn isolation_cell(s: Option<&Subject>) -> String {
    match s.map(|s| &s.isolation) {
        Some(Isolation::Probed { rows, .. }) => {
            let shared: Vec<&str> = rows.iter().filter(|r| r.shared).map(|r| r.dimension.as_str()).collect();
            let level = match shared.len() {
                0 => "High",
                n if n < rows.len() / 2 + 1 => "Medium",
                _ => "Low",
            };
            if shared.is_empty() {
                format!("{level}: shares none of {} probed", rows.len())
            } else {
                format!("{level}: shares {}", shared.join(", "))
            }
        }
        Some(Isolation::NotRun { reason }) => format!("not run: {reason}"),
        Some(Isolation::Failed { reason }) => format!("failed: {reason}"),
        None => "-".into(),
    }
}

/// The seed's table (start time, base memory, isolation, density) with measured numbers.
fn seed_table(r: &Results) -> Table {
    let mut head = vec!["Metric".to_string()];
    head.extend(Kind::ALL.iter().map(|k| k.title().to_string()));
    let row = |name: &str, f: &dyn Fn(Option<&Subject>) -> String| -> Vec<String> {
        let mut v = vec![name.to_string()];
        v.extend(Kind::ALL.iter().map(|k| f(r.isla(*k))));
        v
    };
    let fig = |k: &'static str| move |s: Option<&Subject>| cell(s.and_then(|s| s.figure(k)));
    let density = |s: Option<&Subject>| match (
        s.and_then(|s| s.figure(key::DENSITY)),
        s.and_then(|s| s.figure(key::DENSITY_PROJECTED)),
    ) {
        (Some(a), Some(b)) if b.median().is_some() => {
            format!("{} started; {} per budget", cell(Some(a)), cell(Some(b)))
        }
        (a, _) => cell(a),
    };
    Table {
        head,
        rows: vec![
            row("Start time", &fig(key::START)),
            row("Base memory", &fig(key::MEMORY)),
            row("Isolation", &isolation_cell),
            row("Density", &density),
        ],
    }
}

/// Workloads: host, then isla's kinds (with the share of the host's figure).
fn workload_table(r: &Results) -> Table {
    let mut head = vec!["Workload".to_string(), "host".to_string()];
    head.extend(Kind::ALL.iter().map(|k| k.title().to_string()));
    let rows = key::WORKLOADS
        .iter()
        .map(|k| {
            let base = r.baseline(k);
            let title = base.map(|f| f.title.clone()).unwrap_or_else(|| k.to_string());
            let mut row = vec![title, cell(base)];
            for kind in Kind::ALL {
                let f = r.isla(kind).and_then(|s| s.figure(k));
                let mut c = cell(f);
                if let (Some(v), Some(h)) = (f.and_then(Figure::median), base.and_then(Figure::median)) {
                    let higher = f.is_some_and(|f| f.higher_is_better);
                    if h > 0.0 && higher {
                        c.push_str(&format!(" [{}% of host]", num(v / h * 100.0)));
                    } else if h > 0.0 {
                        c.push_str(&format!(" [{}x host]", num(v / h)));
                    }
                }
                row.push(c);
            }
            row
        })
        .collect();
    Table { head, rows }
}

/// Peers against isla, as ratios (peer / isla) of the medians.
fn peer_table(r: &Results) -> Table {
    let head = ["Kind", "Peer", "start (peer)", "start ratio peer/isla", "memory (peer)", "memory ratio peer/isla"];
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        let Some(isla) = r.isla(kind) else { continue };
        for p in r.peers(kind) {
            let ratio = |k: &str| ratio_cell(p.figure(k), isla.figure(k));
            rows.push(vec![
                kind.title().to_string(),
                p.name.clone(),
                cell(p.figure(key::START)),
                ratio(key::START),
                cell(p.figure(key::MEMORY)),
                ratio(key::MEMORY),
            ]);
        }
    }
    Table { head: head.iter().map(|s| s.to_string()).collect(), rows }
}

/// The workloads inside each peer against the same workloads inside isla's instance of that kind,
/// as ratios (peer / isla) of the medians, one column per peer that ran them; above 1 means the
/// peer did more (or, for latencies, took longer).
fn peer_workload_table(r: &Results) -> Table {
    let mut pairs = Vec::new();
    for kind in Kind::ALL {
        let Some(isla) = r.isla(kind) else { continue };
        for p in r.peers(kind) {
            if key::WORKLOADS.iter().any(|k| p.figure(k).and_then(Figure::median).is_some()) {
                pairs.push((kind, p, isla));
            }
        }
    }
    let mut head = vec!["Workload (peer/isla)".to_string()];
    head.extend(pairs.iter().map(|(kind, p, _)| format!("{} {}", kind.title(), p.name)));
    let rows = if pairs.is_empty() {
        Vec::new()
    } else {
        key::WORKLOADS
            .iter()
            .map(|k| {
                let title = r.baseline(k).map(|f| f.title.clone()).unwrap_or_else(|| k.to_string());
                let mut row = vec![title];
                row.extend(pairs.iter().map(|(_, p, isla)| ratio_cell(p.figure(k), isla.figure(k))));
                row
            })
            .collect()
    };
    Table { head, rows }
}

/// `peer / isla` of two figures' medians, or "-" where either is missing.
fn ratio_cell(peer: Option<&Figure>, isla: Option<&Figure>) -> String {
    match (peer.and_then(Figure::median), isla.and_then(Figure::median)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn isolation_table(r: &Results) -> Table {
    let mut head = vec!["Shared with the host?".to_string()];
    let probed: Vec<&Subject> = r.subjects.iter().filter(|s| matches!(s.isolation, Isolation::Probed { .. })).collect();
    head.extend(probed.iter().map(|s| s.name.clone()));
    let dims = ["kernel", "PID space", "network", "filesystem", "devices"];
    let rows = dims
        .iter()
        .map(|d| {
            let mut row = vec![d.to_string()];
            for s in &probed {
                if let Isolation::Probed { rows, .. } = &s.isolation {
                    row.push(match rows.iter().find(|x| x.dimension == *d) {
                        Some(x) => format!("{}: {}", if x.shared { "shared" } else { "separate" }, x.evidence),
                        None => "-".into(),
                    });
                }
            }
            row
        })
        .collect();
    Table { head, rows }
}

/// Every figure with its method and notes.
fn methods(r: &Results) -> Vec<(String, &Figure)> {
    let mut v: Vec<(String, &Figure)> = r.host_baseline.iter().map(|f| ("host".to_string(), f)).collect();
    for s in &r.subjects {
        v.extend(s.figures.iter().map(|f| (s.name.clone(), f)));
    }
    v
}

fn phases_text(f: &Figure) -> Vec<String> {
    match &f.outcome {
        Outcome::Measured { phases, notes, .. } => phases
            .iter()
            .map(|p| {
                let (m, lo, hi) = (num(p.summary.median), num(p.summary.min), num(p.summary.max));
                format!("part {}: {m} {} ({lo}-{hi})", p.name, f.unit)
            })
            .chain(notes.iter().cloned())
            .collect(),
        _ => Vec::new(),
    }
}

fn header(r: &Results) -> String {
    format!(
        "host: {} ({} CPUs, {} MiB, kernel {}{}); {} run(s) per start measurement{}; budget {} MiB; {:.0} s",
        r.host.cpu_model,
        r.host.cpus,
        r.host.mem_total_kib / 1024,
        r.host.kernel,
        if r.host.nested_pvm { ", nested PVM KVM" } else { "" },
        r.run.runs,
        if r.run.quick { " (--quick)" } else { "" },
        r.run.budget_mib,
        r.run.wall_s
    )
}

/// The terminal report: the seed's table, then workloads and peers.
pub fn terminal(r: &Results) -> String {
    let text = |t: &Table| -> String {
        let cols = t.head.len();
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                t.rows
                    .iter()
                    .map(|row| row[c].chars().count())
                    .chain([t.head[c].chars().count()])
                    .max()
                    .unwrap_or(0)
                    .min(48)
            })
            .collect();
        let line = |cells: &[String]| -> String {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let c: String = c.chars().take(48).collect();
                    format!("{c:<w$}", w = width[i])
                })
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let mut s = line(&t.head) + "\n";
        s.push_str(&width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-"));
        s.push('\n');
        for row in &t.rows {
            s.push_str(&line(row));
            s.push('\n');
        }
        s
    };
    let mut s = format!("isla lab: {}\n\n", header(r));
    s.push_str(&text(&seed_table(r)));
    s.push('\n');
    s.push_str(&text(&workload_table(r)));
    for t in [peer_table(r), peer_workload_table(r)] {
        if !t.rows.is_empty() {
            s.push('\n');
            s.push_str(&text(&t));
        }
    }
    s
}

/// The report's parts in order, rendered by [`markdown`] and [`html`] alike.
enum Block {
    Heading(&'static str),
    Table(Table),
    Plots,
    Methods,
}

fn blocks(r: &Results) -> Vec<Block> {
    let mut v = vec![
        Block::Heading("The comparison table (seed 000), measured"),
        Block::Table(seed_table(r)),
        Block::Plots,
        Block::Heading("Workloads inside each kind against the host"),
        Block::Table(workload_table(r)),
    ];
    let peers = peer_table(r);
    if !peers.rows.is_empty() {
        v.push(Block::Heading("Peers (same run, ratios of medians)"));
        v.push(Block::Table(peers));
    }
    let peer_work = peer_workload_table(r);
    if !peer_work.rows.is_empty() {
        v.push(Block::Heading("Workloads inside the peers (same run, ratios of medians to isla's)"));
        v.push(Block::Table(peer_work));
    }
    v.push(Block::Heading("Isolation, probed inside each kind"));
    v.push(Block::Table(isolation_table(r)));
    v.push(Block::Heading("How each figure was measured"));
    v.push(Block::Methods);
    v
}

fn md_table(t: &Table) -> String {
    let esc = |c: &str| c.replace('|', "\\|").replace('\n', " ");
    let mut s = format!("| {} |\n", t.head.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | "));
    s.push_str(&format!("|{}\n", "---|".repeat(t.head.len())));
    for row in &t.rows {
        s.push_str(&format!("| {} |\n", row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")));
    }
    s
}

/// report.md (the plots are in report.html).
pub fn markdown(r: &Results) -> String {
    let mut s = format!("# isla lab report\n\n{}\n", header(r));
    for b in blocks(r) {
        match b {
            Block::Heading(h) => s.push_str(&format!("\n## {h}\n\n")),
            Block::Table(t) => s.push_str(&md_table(&t)),
            Block::Plots => {}
            Block::Methods => {
                for (who, f) in methods(r) {
                    s.push_str(&format!("- **{who}, {}**: {}. *Method:* {}", f.title, f.brief(), f.method));
                    for p in phases_text(f) {
                        s.push_str(&format!("; {p}"));
                    }
                    s.push('\n');
                }
            }
        }
    }
    s.push_str("\nEvery raw sample is in `results.json`; the plots are in `report.html`.\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_table(t: &Table) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in &t.head {
        s.push_str(&format!("<th>{}</th>", esc(h)));
    }
    s.push_str("</tr></thead><tbody>");
    for row in &t.rows {
        s.push_str("<tr>");
        for c in row {
            s.push_str(&format!("<td>{}</td>", esc(c)));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>\n");
    s
}

/// report.html: self-contained (inline CSS and SVG, no scripts, nothing fetched).
pub fn html(r: &Results) -> Result<String> {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>isla lab report</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top;font-size:14px}\
         th{background:#eee}figure{margin:1em 0}li{margin:0.3em 0}.m{color:#555;font-size:13px}</style></head><body>\n",
    );
    s.push_str(&format!("<h1>isla lab report</h1><p>{}</p>\n", esc(&header(r))));
    for b in blocks(r) {
        match b {
            Block::Heading(h) => s.push_str(&format!("<h2>{}</h2>\n", esc(h))),
            Block::Table(t) => s.push_str(&html_table(&t)),
            Block::Plots => {
                s.push_str(
                    "<h2>Plots</h2><p>Bars are medians, whiskers span min to max; guests and the host are compared \
                     on log scales where they differ by orders of magnitude. A bar missing says why.</p>\n",
                );
                for p in plot::all(r)? {
                    s.push_str(&format!("<figure>{}</figure>\n", p.svg));
                }
            }
            Block::Methods => {
                s.push_str("<ul>\n");
                for (who, f) in methods(r) {
                    s.push_str(&format!(
                        "<li><b>{}, {}</b>: {}<div class=\"m\">Method: {}",
                        esc(&who),
                        esc(&f.title),
                        esc(&f.brief()),
                        esc(&f.method)
                    ));
                    for p in phases_text(f) {
                        s.push_str(&format!("<br>{}", esc(&p)));
                    }
                    s.push_str("</div></li>\n");
                }
                s.push_str("</ul>\n");
            }
        }
    }
    s.push_str("<p>Every raw sample is in <code>results.json</code>.</p></body></html>\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostInfo, Probe, RunInfo, Shared};

    fn results() -> Results {
        let start =
            Figure::from_samples(key::START, "start", "ms", "timed <from> spawn".into(), vec![20.0, 25.0, 22.0], "");
        let probe = Probe::default();
        let container = Subject {
            name: "isla runtime (isla)".into(),
            kind: Kind::Container,
            peer: false,
            figures: vec![
                start.clone(),
                Figure::from_samples(key::CPU, "CPU", "events/s", "sysbench".into(), vec![900.0], ""),
            ],
            isolation: Isolation::Probed {
                probe,
                rows: vec![
                    Shared { dimension: "kernel".into(), shared: true, evidence: "same boot_id".into() },
                    Shared { dimension: "network".into(), shared: false, evidence: "lo only".into() },
                ],
                method: "probes".into(),
            },
        };
        let mut crun = container.clone();
        crun.name = "crun".into();
        crun.peer = true;
        crun.figures = vec![Figure::from_samples(key::START, "start", "ms", "m".into(), vec![11.0], "")];
        let vm = Subject {
            name: "isla vm".into(),
            kind: Kind::Vm,
            peer: false,
            figures: vec![Figure::not_run(key::START, "start", "ms", "m".into(), "no qemu".into())],
            isolation: Isolation::NotRun { reason: "no qemu".into() },
        };
        Results {
            run: RunInfo {
                quick: true,
                runs: 3,
                kinds: vec![Kind::Container, Kind::Vm],
                budget_mib: 512,
                started_unix: 0,
                wall_s: 1.0,
                isla_version: "0".into(),
            },
            host: HostInfo {
                kernel: "6.1".into(),
                cpus: 2,
                mem_total_kib: 1 << 20,
                cpu_model: "cpu".into(),
                nested_pvm: false,
            },
            host_baseline: vec![Figure::from_samples(key::CPU, "CPU", "events/s", "sysbench".into(), vec![1000.0], "")],
            host_probe: Some(Probe::default()),
            subjects: vec![container, crun, vm],
        }
    }

    #[test]
    fn terminal_and_markdown_hold_the_seed_table() {
        let r = results();
        let t = terminal(&r);
        assert!(t.contains("Start time") && t.contains("22 ms (20-25)"), "{t}");
        assert!(t.contains("not run: no qemu"), "{t}");
        assert!(t.contains("Medium: shares kernel"), "{t}");
        assert!(t.contains("[90% of host]"), "{t}");
        assert!(t.contains("0.50x"), "crun's start over isla's: {t}");
        let m = markdown(&r);
        assert!(m.contains("| Start time |") && m.contains("*Method:* timed <from> spawn"), "{m}");
    }

    #[test]
    fn peers_that_ran_the_workloads_get_ratios_to_isla() {
        let mut r = results();
        assert!(peer_workload_table(&r).rows.is_empty(), "crun ran no workload: no table");
        r.subjects[1].figures.push(Figure::from_samples(
            key::CPU,
            "CPU",
            "events/s",
            "sysbench".into(),
            vec![450.0],
            "",
        ));
        let t = peer_workload_table(&r);
        assert_eq!(t.head, ["Workload (peer/isla)", &format!("{} crun", Kind::Container.title())]);
        let cpu = t.rows.iter().find(|row| row[0] == "CPU").expect("a CPU row");
        assert_eq!(cpu[1], "0.50x", "450 against isla's 900");
        assert!(t.rows.iter().filter(|row| row[0] != "CPU").all(|row| row[1] == "-"), "{:?}", t.rows);
        assert!(markdown(&r).contains("Workloads inside the peers"));
    }

    #[test]
    fn html_is_self_contained_with_every_plot() {
        let h = html(&results()).unwrap();
        for id in plot::IDS {
            assert!(h.contains(&format!("<svg id=\"{id}\"")), "{id} missing");
        }
        assert!(h.contains("timed &lt;from&gt; spawn"), "text is escaped");
        assert!(!h.contains("<script") && !h.contains(" src=") && !h.contains("<link"), "nothing to fetch");
    }
}
